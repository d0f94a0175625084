// s4lib's fused recurrent step of one FFTConv / S4Block: s4lib/fused_step.py is its Python side.
//
// A Layer holds one layer's packed step parameters (see kernels/s4_layer_step.h for the SSM and its
// layout) and an optional output stage, and steps a batch of rows in one call:
//
//   s = act(SSM step(u) + D u)           (FFTConv.step; the states are read from x_in, written to x_out)
//   y = s | GLU(W s + b) | W s + b       (S4Block.step with final_act 'glu' / None / linear)
//
// The states are the user's complex64 (B, H, n) tensors viewed as float32: the fused step and
// the eager step share one state format. Rows are split into `threads` contiguous slices
// (at::parallel_for); each row's arithmetic does not depend on the split.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <tuple>
#include <vector>

#include "s4_layer_step.h"

namespace s4step {

enum Out : int64_t { kOutNone = 0, kOutGLU = 1, kOutLinear = 2 };

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
    auto rows = [&](int64_t r0, int64_t R) {
      FlushDenormals flush;
      float* ax = aux_p ? aux_p + r0 * H_ * 2 * ssm_.rank : nullptr;
      if (out_kind_ == kOutNone) {
        ssm_rows(ssm_, up + r0 * H_, H_, xi + r0 * H_ * np, xo + r0 * H_ * np, ax, have_aux, yp + r0 * H_, H_, R);
        return;
      }
      std::vector<float> scratch(R * (Hp_ + out_.out));  // zero: the padding columns of s stay zero
      float* s = scratch.data();
      float* big = s + R * Hp_;
      ssm_rows(ssm_, up + r0 * H_, H_, xi + r0 * H_ * np, xo + r0 * H_ * np, ax, have_aux, s, Hp_, R);
      gemm<false>(s, Hp_, R, out_, big, out_.out);
      const int64_t F = out_features_;
      if (out_kind_ == kOutGLU) {
        const int64_t Fp = out_.out / 2;
        glu_rows<false>(big, out_.out, Fp, big, out_.out, R);  // in place: row r's first Fp floats
      }
      for (int64_t r = 0; r < R; ++r) std::memcpy(yp + (r0 + r) * F, big + r * out_.out, F * sizeof(float));
    };
    const int64_t chunks = std::min<int64_t>(B, std::max<int64_t>(1, threads));
    if (chunks <= 1) {
      rows(0, B);
      return {y, next};
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * B / chunks, r1 = (c + 1) * B / chunks;
        if (r1 > r0) rows(r0, r1 - r0);
      }
    });
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
      .def("step", &Layer::step, py::call_guard<py::gil_scoped_release>())
      .def("refresh", &Layer::refresh, py::call_guard<py::gil_scoped_release>());
}
