// s4lib's fused recurrent step of one FFTConv / S4Block: s4lib/fused_step.py is its Python side.
//
// A Layer holds one layer's packed step parameters (see kernels/s4_layer_step.h for the SSM and its
// layout) and an optional output stage, and steps a batch of rows in one call:
//
//   s = act(SSM step(u) + D u)           (FFTConv.step; the states are read from x_in, written to x_out)
//   y = s | GLU(W s + b) | W s + b       (S4Block.step with final_act 'glu' / None / linear)
//
// The states are the user's complex64 (B, H, n) tensors viewed as float32: the fused step and
// the eager step share one state format. `threads` members of a persistent team (kernels/step_team.h)
// split each step's channels (SSM) and output panels (linear) in multiples of VL, with one barrier
// between the two; every output is computed by the same operations whatever the split.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <tuple>
#include <vector>

#include "s4_layer_step.h"
#include "step_team.h"

namespace s4step {

namespace py = pybind11;

enum Out : int64_t { kOutNone = 0, kOutGLU = 1, kOutLinear = 2 };

static void copy_columns(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t R, int64_t c0, int64_t c1) {
  if (c1 > c0)
    for (int64_t r = 0; r < R; ++r) std::memcpy(dst + r * ldd + c0, src + r * lds + c0, (c1 - c0) * sizeof(float));
}

static void check_f32(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == at::IntArrayRef(shape),
              "s4_step: ", name, " must be a contiguous float32 CPU tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes());
}

class Layer {
 public:
  Layer(int64_t kind, int64_t rank, int64_t n, int64_t act, at::Tensor par, at::Tensor chan, int64_t out_kind,
        int64_t out_features, at::Tensor out_w, at::Tensor out_b)
      : ssm_(make_ssm(kind, rank, n, act, par, chan)), out_kind_(out_kind), out_features_(out_features) {
    kept_ = {par, chan, out_w, out_b};
    H_ = ssm_.H, Hp_ = (H_ + VL - 1) / VL * VL;
    TORCH_CHECK(out_kind >= kOutNone && out_kind <= kOutLinear, "s4_step: unknown output kind ", out_kind);
    if (out_kind == kOutNone) {
      TORCH_CHECK(out_features == H_, "s4_step: without an output linear the output width is H");
      return;
    }
    TORCH_CHECK(out_w.device().is_cpu() && out_w.scalar_type() == at::kFloat && out_w.is_contiguous() &&
                    out_w.dim() == 3 && out_w.size(1) == Hp_ && out_w.size(2) == VL,
                "s4_step: packed output weight must be float32 (out / ", VL, ", ", Hp_, ", ", VL, "), got ",
                out_w.sizes());
    out_.in = Hp_, out_.out = out_w.size(0) * VL;
    check_f32(out_b, "output bias", {out_.out});
    out_.w = out_w.data_ptr<float>(), out_.b = out_b.data_ptr<float>();
    const int64_t want = out_kind == kOutGLU ? 2 * ((out_features + VL - 1) / VL * VL) : (out_features + VL - 1) / VL * VL;
    TORCH_CHECK(out_.out == want, "s4_step: packed output width ", out_.out, ", expected ", want);
  }

  int64_t width() const { return H_; }

  // What the layer was packed from: (dict, key, object) entries (the module attributes, compared by
  // identity), the parameter tensors (version counters and data pointers), and the thread policy's
  // threshold (fused_step.SPLIT_BYTES) with the bytes of parameters a step reads.
  void watch(std::vector<std::tuple<py::object, py::object, py::object>> entries, std::vector<at::Tensor> tensors,
             int64_t split_bytes, int64_t work) {
    entries_ = std::move(entries);
    tensors_ = std::move(tensors);
    marks_.clear();
    for (const auto& t : tensors_) marks_.push_back(mark(t));
    split_bytes_ = split_bytes, work_ = work;
  }

  // The call path of FFTConv.step / S4Block.step: (y, next state), or None when this layer cannot serve
  // the call as packed (an attribute or parameter changed, input or state not float32 / complex64 of
  // the right shape, autograd recording): the caller then takes the checked path. threads 0: the policy
  // of s4lib.fused_step.default_threads (1 below 8 rows).
  // The DPLR auxiliaries are kept for the state the layer returned last, while it is passed back unchanged.
  py::object fast_step(py::handle x_obj, py::handle state_obj, int64_t threads) {
    for (const auto& [dict, key, obj] : entries_) {
      PyObject* now = PyDict_GetItem(dict.ptr(), key.ptr());  // borrowed, no exception set
      if (now != obj.ptr()) return py::none();
    }
    for (size_t i = 0; i < tensors_.size(); ++i)
      if (mark(tensors_[i]) != marks_[i]) return py::none();
    if (!THPVariable_Check(x_obj.ptr()) || !THPVariable_Check(state_obj.ptr())) return py::none();
    const at::Tensor& x = THPVariable_Unpack(x_obj.ptr());
    const at::Tensor& state = THPVariable_Unpack(state_obj.ptr());
    if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || x.dim() != 2 || x.size(1) != H_) return py::none();
    const int64_t B = x.size(0);
    if (!state.device().is_cpu() || state.scalar_type() != at::kComplexFloat || state.dim() != 3 ||
        state.size(0) != B || state.size(1) != H_ || state.size(2) != ssm_.n)
      return py::none();
    if (at::GradMode::is_enabled()) {
      bool grad = x.requires_grad() || state.requires_grad();
      for (const auto& t : tensors_) grad = grad || t.requires_grad();
      if (grad) return py::none();
    }
    bool have_aux = false;
    if (ssm_.kind == kDPLR) {
      if (!aux_.defined() || aux_.size(0) != B) aux_ = at::empty({B, H_, 2 * ssm_.rank}, x.options());
      have_aux = last_.defined() && state.is_same(last_) && !state.is_inference() && state._version() == last_version_;
    }
    if (threads <= 0)  // the policy of s4lib.fused_step.default_threads
      threads = B >= kSplitBatch && work_ * kSplitBatch >= split_bytes_
                    ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 4)) : 1;
    std::tuple<at::Tensor, at::Tensor> out;
    {
      py::gil_scoped_release nogil;
      out = step(x.contiguous(), state.contiguous(), aux_, have_aux, threads);
    }
    if (ssm_.kind == kDPLR) {
      last_ = std::get<1>(out);
      last_version_ = last_.is_inference() ? 0 : last_._version();
    }
    return py::make_tuple(std::get<0>(out), std::get<1>(out));
  }

  // u (B, H) float32, state complex64 (B, H, n) (not modified); aux (B, H, 2 rank) float32 (S4 only;
  // read when have_aux, written always) -> (y (B, out_features), next state complex64 (B, H, n)).
  std::tuple<at::Tensor, at::Tensor> step(at::Tensor u, at::Tensor state, at::Tensor aux, bool have_aux,
                                          int64_t threads) {
    TORCH_CHECK(u.dim() == 2, "s4_step: input must be (batch, H)");
    const int64_t B = u.size(0);
    check_f32(u, "input", {B, H_});
    TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kComplexFloat && state.is_contiguous() &&
                    state.sizes() == at::IntArrayRef({B, H_, ssm_.n}),
                "s4_step: state must be a contiguous complex64 CPU tensor (", B, ", ", H_, ", ", ssm_.n, "), got ",
                state.scalar_type(), " ", state.sizes());
    at::Tensor next = at::empty_like(state);
    at::Tensor y = at::empty({B, out_features_}, u.options());
    float* aux_p = nullptr;
    if (ssm_.kind == kDPLR) {
      check_f32(aux, "aux", {B, H_, 2 * ssm_.rank});
      aux_p = aux.data_ptr<float>();
    }
    const float* up = u.data_ptr<float>();
    const float* xi = reinterpret_cast<const float*>(state.data_ptr<c10::complex<float>>());
    float* xo = reinterpret_cast<float*>(next.data_ptr<c10::complex<float>>());
    float* yp = y.data_ptr<float>();
    const int64_t np = 2 * ssm_.n;
    std::vector<float> scratch(out_kind_ == kOutNone ? 0 : B * (Hp_ + out_.out));  // zero: padding of s stays zero
    float* s = scratch.data();
    float* big = s + B * Hp_;
    // threads split the channels of the SSM and the output panels of the linear (one barrier between)
    auto job = [&](const Part& part) {
      FlushDenormals flush;
      const auto [h0, h1] = panel_channels(part.range(Hp_ / VL), H_);
      if (out_kind_ == kOutNone) {
        ssm_rows(ssm_, up, H_, xi, xo, aux_p, have_aux, yp, H_, B, h0, h1);
        return;
      }
      ssm_rows(ssm_, up, H_, xi, xo, aux_p, have_aux, s, Hp_, B, h0, h1);
      part.sync();
      const int64_t F = out_features_;
      if (out_kind_ == kOutGLU) {
        const int64_t Fp = out_.out / 2, half = Fp / VL;
        const auto [q0, q1] = part.range(half);
        gemm<false>(s, Hp_, B, out_, big, out_.out, q0, q1);
        gemm<false>(s, Hp_, B, out_, big, out_.out, half + q0, half + q1);
        glu_rows<false>(big, out_.out, Fp, big, out_.out, B, q0 * VL, q1 * VL);  // in place: a's columns
        copy_columns(big, out_.out, yp, F, B, q0 * VL, std::min(q1 * VL, F));
      } else {
        const auto [q0, q1] = part.range(out_.out / VL);
        gemm<false>(s, Hp_, B, out_, big, out_.out, q0, q1);
        copy_columns(big, out_.out, yp, F, B, q0 * VL, std::min(q1 * VL, F));
      }
    };
    Team::instance().run((int)std::min<int64_t>(std::max<int64_t>(threads, 1), Hp_ / VL), job);
    return {y, next};
  }

  // aux (B, H, 2 rank) of the states x (B, H, n, 2).
  void refresh(at::Tensor x, at::Tensor aux) {
    if (ssm_.kind != kDPLR) return;
    const int64_t B = x.size(0);
    check_f32(x, "state", {B, H_, ssm_.n, 2});
    check_f32(aux, "aux", {B, H_, 2 * ssm_.rank});
    ssm_refresh(ssm_, x.data_ptr<float>(), aux.data_ptr<float>(), B);
  }

 private:
  SSM ssm_;
  int64_t out_kind_, out_features_, H_ = 0, Hp_ = 0;
  std::vector<std::tuple<py::object, py::object, py::object>> entries_;
  std::vector<at::Tensor> tensors_;
  std::vector<std::pair<int64_t, const void*>> marks_;
  int64_t split_bytes_ = 1, work_ = 0;
  at::Tensor aux_, last_;
  static constexpr int64_t kSplitBatch = 8;  // s4lib.fused_step.SPLIT_BATCH
  int64_t last_version_ = 0;

  static std::pair<int64_t, const void*> mark(const at::Tensor& t) {
    return {t.is_inference() ? 0 : (int64_t)t._version(), t.data_ptr()};
  }
  Linear out_;
  std::vector<at::Tensor> kept_;  // the memory the layer reads
};

}  // namespace s4step

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using s4step::Layer;
  m.doc() = "s4lib's fused recurrent step of FFTConv / S4Block (see s4lib/fused_step.py)";
  m.attr("VECTOR") = s4step::VL;
  py::class_<Layer>(m, "Layer")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, at::Tensor, at::Tensor, int64_t, int64_t, at::Tensor,
                    at::Tensor>())
      .def("width", &Layer::width)
      .def("watch", &Layer::watch)
      .def("fast_step", &Layer::fast_step)
      .def("step", &Layer::step, py::call_guard<py::gil_scoped_release>())
      .def("refresh", &Layer::refresh, py::call_guard<py::gil_scoped_release>());
}
