// SaShiMi.step's state dict kept in step with the fused engine's own state (sashimi/nn/fused_backbone.py).
//
// The eager SaShiMi.step updates a dict of lists in place ({"down", "up": per level, per block: complex
// (B, H, n) or None; "center": per block; "buffer": per level, the DownPool inputs since it fired;
// "pending": per level, (B, p H)}) and never modifies its tensors in place. The engine keeps the
// state in its own memory; after each step it mirrors the eager step's changes into the dict (new
// tensors for the levels that ran, buffers appended or cleared, pending replaced) and records the
// identities of the dict's containers and tensors. A later call with the same dict, unchanged, steps
// on; any other dict (or one whose containers or tensors were replaced) is reported, and the Python
// side loads it into the engine first. All of this in one call: no Python bookkeeping per step.
#pragma once

#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace sashimi_step {

namespace py = pybind11;

// The engine's memory behind one level's entries of the dict.
struct LevelMemory {
  std::vector<const float*> states;  // S4 states in the order of the level's slots, each (B, H, n) complex
  std::vector<int64_t> n;            // their state sizes
  const float* buffer = nullptr;     // (B, p, Hp)
  const float* pending = nullptr;    // (B, p Hp)
  int64_t p = 0, H = 0, Hp = 0;
};

class StateDict {
 public:
  // slots[i]: (key, level, j) per S4 state of level i (the centre last), key 0 = down, 1 = up, 2 = center.
  void set_layout(std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>> slots, bool input_is_buffered) {
    slots_ = std::move(slots);
    input_is_buffered_ = input_is_buffered;
    last_ = py::none();
    snapshot_.clear();
  }

  // Is `state` the dict the last update returned, with the same containers and tensors?
  bool is_current(const py::handle& state) const {
    if (last_.is_none() || !state.is(last_)) return false;
    std::vector<intptr_t> now;
    return take(state, now) && now == snapshot_;
  }

  // Remember `state` as current (after the Python side loaded it into the engine).
  void adopt(const py::handle& state) {
    last_ = py::reinterpret_borrow<py::object>(state);
    if (!take(state, snapshot_)) last_ = py::none();
  }

  void forget() {
    last_ = py::none();
    snapshot_.clear();
  }

  // Mirror one step into `state`: levels [0, ran) ran (the centre is level n_pool); `slot` is the
  // buffer slot level ran - 1 wrote; x is the step's input object (level 0's DownPool input).
  void update(py::dict state, const std::vector<LevelMemory>& mem, int64_t B, int64_t ran, int64_t slot,
              const py::handle& x) {
    const int64_t n_pool = (int64_t)mem.size() - 1;
    static const char* keys[3] = {"down", "up", "center"};
    py::list buffers = state["buffer"], pendings = state["pending"];
    for (int64_t i = 0; i < std::min(ran, n_pool + 1); ++i) {
      const LevelMemory& lv = mem[i];
      for (size_t k = 0; k < slots_[i].size(); ++k) {
        const auto [key, level, j] = slots_[i][k];
        py::object t = py::cast(copy_state(lv.states[k], B, lv.H, lv.n[k]));
        if (key == 2) {
          py::list center = state["center"];
          center[j] = t;
        } else {
          py::list groups = state[keys[key]];
          py::list group = groups[level];
          group[j] = t;
        }
      }
      if (i >= n_pool) continue;
      py::list buffer = buffers[i];
      if (i == ran - 1) {
        if (i == 0 && input_is_buffered_) {
          buffer.append(x);
        } else {
          at::Tensor t = at::empty({B, lv.H});
          float* d = t.data_ptr<float>();
          for (int64_t b = 0; b < B; ++b)
            std::memcpy(d + b * lv.H, lv.buffer + (b * lv.p + slot) * lv.Hp, lv.H * sizeof(float));
          buffer.append(py::cast(t));
        }
      } else {  // level i fired: its DownPool is empty, its UpPool refilled pending
        PyList_SetSlice(buffer.ptr(), 0, PyList_GET_SIZE(buffer.ptr()), nullptr);
        at::Tensor t = at::empty({B, lv.p * lv.H});
        float* d = t.data_ptr<float>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t s = 0; s < lv.p; ++s)
            std::memcpy(d + (b * lv.p + s) * lv.H, lv.pending + (b * lv.p + s) * lv.Hp, lv.H * sizeof(float));
        pendings[i] = py::cast(t);
      }
    }
    adopt(state);
  }

 private:
  std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>> slots_;
  bool input_is_buffered_ = false;
  py::object last_ = py::none();
  std::vector<intptr_t> snapshot_;

  static at::Tensor copy_state(const float* src, int64_t B, int64_t H, int64_t n) {
    at::Tensor t = at::empty({B, H, n}, at::TensorOptions().dtype(at::kComplexFloat));
    std::memcpy(t.data_ptr(), src, B * H * 2 * n * sizeof(float));
    return t;
  }

  // Identities of the dict's containers and tensors, and the buffers' lengths (false: not such a dict).
  static bool take(const py::handle& state, std::vector<intptr_t>& out) {
    out.clear();
    PyObject* d = state.ptr();
    if (!PyDict_Check(d)) return false;
    auto id = [&](PyObject* o) { out.push_back(reinterpret_cast<intptr_t>(o)); };
    auto items = [&](PyObject* list, bool with_length) {
      if (!PyList_Check(list)) return false;
      id(list);
      if (with_length) out.push_back(PyList_GET_SIZE(list));
      for (Py_ssize_t k = 0; k < PyList_GET_SIZE(list); ++k) id(PyList_GET_ITEM(list, k));
      return true;
    };
    for (const char* key : {"down", "up", "center", "buffer", "pending"}) {
      PyObject* v = PyDict_GetItemString(d, key);  // borrowed
      if (v == nullptr || !PyList_Check(v)) return false;
      const bool nested = key[0] == 'd' || key[0] == 'u' || key[0] == 'b';
      if (!nested) {
        if (!items(v, false)) return false;
        continue;
      }
      id(v);
      for (Py_ssize_t k = 0; k < PyList_GET_SIZE(v); ++k)
        if (!items(PyList_GET_ITEM(v, k), key[0] == 'b')) return false;
    }
    out.push_back((intptr_t)PyDict_Size(d));
    return true;
  }
};

}  // namespace sashimi_step
