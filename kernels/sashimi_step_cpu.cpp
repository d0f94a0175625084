// Fused CPU inference engine for the WaveformAR recurrent step: sashimi/pipelines/fast_step.py is its Python side.
//
// One Engine holds a whole model's step parameters (exported, padded and packed by fast_step.py) and
// the recurrent state for a batch of B sequences, and runs, on raw float32 arrays (no ATen ops):
//
//   token -> embedding row -> level 0 -> LayerNorm -> head -> logits
//   level i (pool p_i, width H_i):  [down blocks, U-Net only] -> up path using pending[phase] ->
//       buffer[phase] = x; on the p-th input the DownPool fires, level i + 1 runs one step and the
//       UpPool refills pending (exactly sashimi.nn.backbone.SaShiMi._step_level)
//   centre: y = blocks(x) + x
//   S4 block: LayerNorm -> SSM step (+ D u) -> GELU -> Linear(H, 2H) -> GLU -> + residual
//   FF block: LayerNorm -> Linear(H, ff H) -> GELU -> Linear(ff H, H) -> + residual
//
// The SSM step of an S4 block is s4lib's (kernels/s4_layer_step.h, packed by s4lib.fused_step.pack_ssm),
// the same code as s4lib's fused FFTConv / S4Block step; GEMM and LayerNorm are in kernels/step_simd.h,
// the model's levels and blocks (built and checked from packed tensors) in kernels/sashimi_engine_model.h,
// the thread team in kernels/step_team.h, SaShiMi.step's state dict in kernels/sashimi_state_dict.h and
// the sampling rule in kernels/sashimi_sampling.h.
//
// Layout conventions (float32 unless stated, C-contiguous, produced by sashimi/nn/fused_backbone.py):
//   * an activation of width H is stored padded to Hp = roundup(H, 16) floats per row, padding zero;
//     every padded parameter (biases, norms, SSM planes, packed weight rows/columns) is zero, so the
//     padding stays exactly zero through every operation;
//   * a Linear is packed into panels of 16 output columns: w[(j * in + k) * 16 + c] = W[16 j + c, k]
//     with `in` the padded input width and out = 16 * panels the padded output width (float32, or
//     float16 storage widened to float32 as it is loaded);
//   * S4 state (B, H, n) complex64 as s4lib's default_state (viewed as float32 (B, H, 2n)), DPLR
//     auxiliaries (B, H, 2r); DownPool buffer (B, p, Hp); UpPool pending (B, p * Hp).
//
// Threads, two ways (set_threads / set_split; results are bitwise the same for any count and either way):
//   * rows: rows are independent sequences, so a batch is split into one contiguous slice of rows per
//     thread (at::parallel_for), and each thread runs whole steps (and, in generate(), the whole
//     sampling loop) on its slice without synchronising; every thread reads all the parameters.
//   * columns (small batches, batch 1): the members of a persistent team (kernels/step_team.h) run
//     every step together on all rows, each owning the same VL-wide column panels of every activation
//     at a level (SSM channels, GEMM output panels, residual columns) and so half of every weight
//     matrix (two members); a barrier precedes each operation that reads columns another member wrote
//     (LayerNorm, GEMM inputs), about two per block. LayerNorm statistics are computed by every member
//     over the whole row, in the same order, into private scratch.
// Linear layers are small GEMMs with register tiles of up to 8 rows x 8 vectors; an output's sum is
// the same sequence of operations whatever the tile or the member that computes it.
//
// The sampling rule of generate() is defined in sashimi/pipelines/fast_step.py (module docstring) and
// implemented in sample_row() (kernels/sashimi_sampling.h) with the same float64 operations in the same order.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "s4_layer_step.h"
#include "sashimi_engine_model.h"
#include "sashimi_sampling.h"
#include "sashimi_state_dict.h"
#include "step_simd.h"
#include "step_team.h"

namespace sashimi_step {

using namespace s4step;

constexpr int64_t kColumnsBelow = 8;  // split 0 (auto): columns for batches below this, rows above

class Engine : public EngineModel {
 public:
  using EngineModel::EngineModel;

  // logits (B, n_classes) float32 for tokens (B,) int64.
  void step(at::Tensor tokens, at::Tensor logits) {
    TORCH_CHECK(finalized_, "sashimi_step: finalize() first");
    check_tokens(tokens, 1);
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2 &&
                logits.size(0) == B_ && logits.size(1) == V_, "sashimi_step: logits must be float32 (B, V)");
    const int64_t* tok = tokens.data_ptr<int64_t>();
    float* out = logits.data_ptr<float>();
    dispatch(threads_, [&](int64_t r0, int64_t R, const Part& part) {
      std::vector<int64_t> phase = phase_;
      forward_rows(tok + r0, r0, R, phase.data(), part);
    });
    for (int64_t b = 0; b < B_; ++b) std::memcpy(out + b * V_, logits_.data + b * head_.out, V_ * sizeof(float));
    advance_phases(1);
  }

  // Threads for step() and generate() (0: torch's count; -T: 1 or T, timed, see dispatch) and the way
  // they split a step: 0 = columns below kColumnsBelow rows, else rows; 1 = rows; 2 = columns.
  void set_threads(int64_t threads, int64_t split) {
    TORCH_CHECK(split >= 0 && split <= 2, "sashimi_step: bad thread settings");
    threads_ = threads, split_ = split;
  }

  // Backbone-only step for SaShiMi.step (sashimi_state_dict.h): features x (B, H0) float32 and the state
  // dict -> (y (B, H0) after the output norm if any, status). status 0: stepped, the dict updated as the
  // eager step updates it; 1: the dict is not the one this engine returned last (load it with the state
  // setters, then call again with adopt=True); 2: a watched parameter changed (rebuild the engine).
  py::tuple step_dict(py::object x_obj, py::dict state, int64_t threads, bool adopt) {
    TORCH_CHECK(finalized_ && V_ == 0, "sashimi_step: step_dict needs a finalized backbone-only engine");
    if (signature() != built_signature_) return py::make_tuple(py::none(), 2);
    if (adopt) dict_.adopt(state);
    else if (!dict_.is_current(state)) return py::make_tuple(py::none(), 1);
    const int64_t H0 = levels_[0].H;
    at::Tensor x = x_obj.cast<at::Tensor>();
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == B_ &&
                x.size(1) == H0, "sashimi_step: features must be float32 (", B_, ", ", H0, "), got ", x.sizes());
    x = x.contiguous();
    at::Tensor y = at::empty({B_, H0}, x.options());
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    int64_t ran = 1, slot = -1;
    {
      py::gil_scoped_release nogil;
      dispatch(threads, [&](int64_t r0, int64_t R, const Part& part) {
        std::vector<int64_t> phase = phase_;
        float* x0 = x0_.data + r0 * H0p_;
        const auto [c0, c1] = columns(part, H0p_);
        copy_cols(x0, H0p_, in + r0 * H0, H0, R, c0, std::min(c1, H0));
        float* yl = level_step(0, x0, r0, R, phase.data(), part);
        if (has_out_norm_) {
          part.sync();
          float* z = zbuf(levels_[0], part, r0);
          layer_norm(yl, R, head_norm_, z);
          yl = z;
        }
        copy_cols(out + r0 * H0, H0, yl, H0p_, R, c0, std::min(c1, H0));
      });
      // levels that ran this step: level i + 1 ran iff level i fired
      while (ran < (int64_t)levels_.size() && phase_[ran - 1] == levels_[ran - 1].p - 1) ++ran;
      slot = ran <= (int64_t)phase_.size() ? phase_[ran - 1] : -1;
      advance_phases(1);
      export_states(ran);  // the state tensors of the levels that ran, for the dict's copies
    }
    dict_.update(state, memory_, B_, ran, slot, x_obj);
    return py::make_tuple(y, 0);
  }

  // The dict layout of step_dict (see StateDict::set_layout) and the state memory behind it.
  void set_dict_layout(std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>> slots, bool input_is_buffered) {
    TORCH_CHECK(finalized_ && slots.size() == levels_.size(), "sashimi_step: one slot list per level");
    memory_.clear();
    for (size_t i = 0; i < levels_.size(); ++i) {
      const Level& lv = levels_[i];
      LevelMemory m;
      for (const auto* group : {&lv.down, &lv.up})
        for (const Block& blk : *group)
          if (blk.stateful) m.states.push_back(blk.state), m.n.push_back(blk.ssm.n);
      TORCH_CHECK(m.states.size() == slots[i].size(), "sashimi_step: level ", i, " has ", m.states.size(),
                  " S4 states, the layout ", slots[i].size());
      m.buffer = lv.buffer, m.pending = lv.pending, m.p = lv.p, m.H = lv.H, m.Hp = lv.Hp;
      memory_.push_back(m);
    }
    dict_.set_layout(std::move(slots), input_is_buffered);
  }

  void forget_dict() { dict_.forget(); }

  // The sampling loop: feed first (B,), sample n tokens per row with the rule of fast_step.py.
  void generate(at::Tensor first, at::Tensor uniforms, double temperature, int64_t top_k, double top_p,
                at::Tensor tokens, at::Tensor logprobs) {
    TORCH_CHECK(finalized_, "sashimi_step: finalize() first");
    check_tokens(first, 1);
    TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous() && uniforms.dim() == 2 &&
                uniforms.size(0) == B_, "sashimi_step: uniforms must be float64 (B, n)");
    const int64_t n = uniforms.size(1);
    TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.dim() == 2 &&
                tokens.size(0) == B_ && tokens.size(1) == n, "sashimi_step: tokens must be int64 (B, n)");
    TORCH_CHECK(logprobs.scalar_type() == at::kDouble && logprobs.is_contiguous() && logprobs.dim() == 2 &&
                logprobs.size(0) == B_ && logprobs.size(1) == n, "sashimi_step: logprobs must be float64 (B, n)");
    TORCH_CHECK(temperature >= 0 && std::isfinite(temperature), "sashimi_step: temperature must be >= 0");
    TORCH_CHECK(top_p > 0 && top_p <= 1, "sashimi_step: top_p must be in (0, 1]");
    TORCH_CHECK(top_k >= 0, "sashimi_step: top_k must be >= 0");
    if (n == 0) return;
    const int64_t* first_tok = first.data_ptr<int64_t>();
    const double* u = uniforms.data_ptr<double>();
    int64_t* tok_out = tokens.data_ptr<int64_t>();
    double* lp_out = logprobs.data_ptr<double>();
    std::vector<int64_t> current(first_tok, first_tok + B_);  // the next input of every row
    // in chunks of steps: the thread count may change between them (tuner), never the result
    const int64_t chunk = threads_ < 0 ? 64 : n;
    for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t t1 = std::min(n, t0 + chunk);
    dispatch(threads_, [&](int64_t r0, int64_t R, const Part& part) {
      std::vector<int64_t> phase = phase_;
      SampleScratch scratch;
      const auto [s0, s1] = part.range(R);  // the rows this member samples
      for (int64_t t = t0; t < t1; ++t) {
        forward_rows(current.data() + r0, r0, R, phase.data(), part);
        part.sync();  // every member's logits panels are written
        for (int64_t r = s0; r < s1; ++r) {
          const int64_t b = r0 + r;
          double lp;
          const int64_t chosen = sample_row(logits_.data + b * head_.out, V_, u[b * n + t], temperature, top_k,
                                            top_p, scratch, &lp);
          tok_out[b * n + t] = chosen;
          lp_out[b * n + t] = lp;
          current[b] = chosen;
        }
        part.sync();  // every row's token is chosen before the next step reads the embeddings
      }
    }, t1 - t0);
    advance_phases(t1 - t0);
    }
  }

 private:
  StateDict dict_;
  std::vector<LevelMemory> memory_;
  int64_t threads_ = 0, split_ = 0;  // set_threads
  ThreadTuner tuner_;

  // f(r0, R) on contiguous slices of rows, one per thread (threads < 1: torch's thread count).
  template <class F>
  void parallel_rows(const F& f, int64_t threads = 0) {
    const int64_t chunks = std::min<int64_t>(B_, std::max<int64_t>(1, threads > 0 ? threads : at::get_num_threads()));
    if (chunks <= 1) {
      f(0, B_);
      return;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * B_ / chunks, r1 = (c + 1) * B_ / chunks;
        if (r1 > r0) f(r0, r1 - r0);
      }
    });
  }

  // f(r0, R, part) with `threads` threads (0: torch's count; -T: T, and when T threads would split
  // columns, 1 or T, whichever the tuner finds faster; `units` steps per call), split by rows or by
  // columns (set_threads).
  template <class F>
  void dispatch(int64_t threads, const F& f, int64_t units = 1) {
    if (threads < 0 && !splits_columns(-threads)) threads = -threads;  // rows: one barrier per call, no tuning
    if (threads < 0) {
      const int64_t T = tuner_.pick((int)std::min<int64_t>(kMaxMembers, -threads));
      const double start = seconds_now();
      dispatch(T, f);
      tuner_.record((int)T, (seconds_now() - start) / (double)std::max<int64_t>(units, 1));
      return;
    }
    const int64_t T = std::min<int64_t>(kMaxMembers, std::max<int64_t>(1, threads > 0 ? threads : at::get_num_threads()));
    const bool columns = splits_columns(T);
    if (!columns) {
      parallel_rows([&](int64_t r0, int64_t R) {
        FlushDenormals flush;
        f(r0, R, Part{});
      }, T);
      return;
    }
    Team::instance().run((int)T, [&](const Part& part) {
      FlushDenormals flush;
      f(0, B_, part);
    });
  }

  void advance_phases(int64_t steps) {
    for (int64_t t = 0; t < steps; ++t) {
      for (size_t i = 0; i < phase_.size(); ++i) {
        if (++phase_[i] < levels_[i].p) break;
        phase_[i] = 0;  // level i fired: level i + 1 takes a step
      }
    }
  }

  bool splits_columns(int64_t T) const { return T > 1 && (split_ == 2 || (split_ == 0 && B_ < kColumnsBelow)); }

  // This member's columns [c0, c1) of a padded width Hp (whole VL panels).
  static std::pair<int64_t, int64_t> columns(const Part& part, int64_t Hp) {
    const auto [a, b] = part.range(Hp / VL);
    return {a * VL, b * VL};
  }
  float* zbuf(Level& lv, const Part& part, int64_t r0) { return lv.z.data + (part.m * B_ + r0) * lv.Hp; }

  static void copy_cols(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t R, int64_t c0, int64_t c1) {
    if (c1 > c0)
      for (int64_t r = 0; r < R; ++r) std::memcpy(dst + r * ldd + c0, src + r * lds + c0, (c1 - c0) * sizeof(float));
  }
  // y += a on columns [c0, c1) (multiples of VL) of R rows of width ld
  static void add_cols(float* y, const float* a, int64_t ld, int64_t R, int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = c0; h < c1; h += VL) vstore(y + r * ld + h, vload(y + r * ld + h) + vload(a + r * ld + h));
  }

  // One step for rows [r0, r0 + R): tokens -> logits_ rows (this member's panels).
  void forward_rows(const int64_t* tokens, int64_t r0, int64_t R, int64_t* phase, const Part& part) {
    float* x = x0_.data + r0 * H0p_;
    const auto [c0, c1] = columns(part, H0p_);
    for (int64_t r = 0; r < R; ++r)
      if (c1 > c0) std::memcpy(x + r * H0p_ + c0, embedding_ + tokens[r] * H0p_ + c0, (c1 - c0) * sizeof(float));
    float* y = level_step(0, x, r0, R, phase, part);
    float* z = zbuf(levels_[0], part, r0);
    part.sync();
    layer_norm(y, R, head_norm_, z);
    const auto [q0, q1] = part.range(head_.out / VL);
    gemm<false>(z, H0p_, R, head_, logits_.data + r0 * head_.out, head_.out, q0, q1);
  }

  void block_step(const Block& blk, float* x, int64_t r0, int64_t R, Level& lv, const Part& part) {
    const int64_t Hp = lv.Hp, P = Hp / VL;
    float* z = zbuf(lv, part, r0);
    float* s = lv.s.data + r0 * Hp;
    float* big = lv.big.data + r0 * lv.big_width;
    const auto [c0, c1] = columns(part, Hp);
    part.sync();  // x is complete
    const float* in = x;
    if (blk.prenorm) {
      layer_norm(x, R, blk.norm, z);
      in = z;
    }
    if (blk.stateful) {
      const auto [t0, t1] = part.range(P);  // tiles of VL channels = panels
      ssm_tiled(blk.tiled, in, Hp, blk.tstate + r0 * blk.tiled.state_floats(),
                blk.taux + r0 * blk.tiled.aux_floats(), s, Hp, R, t0, t1);
      part.sync();  // s is complete
      gemm<false>(s, Hp, R, blk.out, big, lv.big_width, c0 / VL, c1 / VL);
      gemm<false>(s, Hp, R, blk.out, big, lv.big_width, P + c0 / VL, P + c1 / VL);
      glu_rows<true>(big, lv.big_width, Hp, x, Hp, R, c0, c1);  // x += GLU(big) = a * sigmoid(b)
    } else {
      const auto [f0, f1] = part.range(blk.ff1.out / VL);
      gemm<false>(in, Hp, R, blk.ff1, big, lv.big_width, f0, f1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t h = f0 * VL; h < f1 * VL; h += VL)
          vstore(big + r * lv.big_width + h, vgelu(vload(big + r * lv.big_width + h)));
      part.sync();  // the hidden layer is complete
      gemm<true>(big, lv.big_width, R, blk.ff2, x, Hp, c0 / VL, c1 / VL);
    }
    if (!blk.prenorm) {
      part.sync();
      layer_norm(x, R, blk.norm, z);
      part.sync();
      copy_cols(x, Hp, z, Hp, R, c0, c1);
    }
  }

  // Level i on input x (R rows of Hp floats); returns the output rows (in this level's scratch).
  // Every member runs the same control flow on its columns.
  float* level_step(size_t i, float* x, int64_t r0, int64_t R, int64_t* phase, const Part& part) {
    Level& lv = levels_[i];
    const int64_t Hp = lv.Hp, n = R * Hp;
    const auto [c0, c1] = columns(part, Hp);
    float* y = lv.y.data + r0 * Hp;
    if (lv.p == 0) {  // centre: blocks(x) + x
      copy_cols(y, Hp, x, Hp, R, c0, c1);
      for (const Block& blk : lv.up) block_step(blk, y, r0, R, lv, part);
      add_cols(y, x, Hp, R, c0, c1);
      return y;
    }
    const bool unet = !lv.down.empty();
    const int64_t ns = (int64_t)lv.down.size() + 1;
    float* skips = lv.skips.data + r0 * Hp * ns;  // ns slices of (R, Hp)
    if (unet) {
      copy_cols(skips, Hp, x, Hp, R, c0, c1);
      for (size_t j = 0; j < lv.down.size(); ++j) {
        float* next = skips + (j + 1) * n;
        copy_cols(next, Hp, skips + j * n, Hp, R, c0, c1);
        block_step(lv.down[j], next, r0, R, lv, part);
      }
      x = skips + (ns - 1) * n;
    }
    // up path from the pending outputs of the previous coarse step
    const int64_t ph = phase[i];
    copy_cols(y, Hp, lv.pending + r0 * lv.p * Hp + ph * Hp, lv.p * Hp, R, c0, c1);
    if (unet) {
      int64_t top = ns - 1;
      add_cols(y, skips + top-- * n, Hp, R, c0, c1);
      for (const Block& blk : lv.up) {
        block_step(blk, y, r0, R, lv, part);
        add_cols(y, skips + top-- * n, Hp, R, c0, c1);
      }
    } else {
      float* u = lv.u.data + r0 * Hp;
      add_cols(y, x, Hp, R, c0, c1);
      copy_cols(u, Hp, y, Hp, R, c0, c1);
      for (const Block& blk : lv.up) block_step(blk, y, r0, R, lv, part);
      add_cols(y, u, Hp, R, c0, c1);
    }
    // the DownPool takes x; on its p-th input it fires and the coarser level runs
    copy_cols(lv.buffer + r0 * lv.p * Hp + ph * Hp, lv.p * Hp, x, Hp, R, c0, c1);
    if (++phase[i] == lv.p) {
      phase[i] = 0;
      const int64_t Hn = levels_[i + 1].Hp;
      float* coarse = lv.coarse.data + r0 * Hn;
      part.sync();  // the buffer is complete
      const auto [d0, d1] = part.range(Hn / VL);
      gemm<false>(lv.buffer + r0 * lv.p * Hp, lv.p * Hp, R, lv.down_pool, coarse, Hn, d0, d1);
      float* c = level_step(i + 1, coarse, r0, R, phase, part);
      part.sync();  // the coarse output is complete
      for (int64_t k = 0; k < lv.p; ++k)  // pending slot k: this member's columns of it
        gemm<false>(c, Hn, R, lv.up_pool, lv.pending + r0 * lv.p * Hp, lv.p * Hp, k * (Hp / VL) + c0 / VL,
                    k * (Hp / VL) + c1 / VL);
    }
    return y;
  }

};

}  // namespace sashimi_step

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using sashimi_step::Engine;
  m.doc() = "Fused CPU engine for the WaveformAR recurrent step (see sashimi/pipelines/fast_step.py)";
  m.attr("VECTOR") = sashimi_step::VL;
  py::class_<Engine>(m, "Engine")
      .def(py::init<int64_t, int64_t, at::Tensor>())
      .def("add_level", &Engine::add_level)
      .def("set_center", &Engine::set_center)
      .def("add_s4_block", &Engine::add_s4_block)
      .def("add_ff_block", &Engine::add_ff_block)
      .def("set_head", &Engine::set_head)
      .def("set_output_norm", &Engine::set_output_norm)
      .def("step_dict", &Engine::step_dict)
      .def("set_dict_layout", &Engine::set_dict_layout)
      .def("forget_dict", &Engine::forget_dict)
      .def("watch", &Engine::watch)
      .def("signature", &Engine::signature)
      .def("finalize", &Engine::finalize)
      .def("refresh", &Engine::refresh)
      .def("export_states", &Engine::export_states, py::arg("levels") = -1)
      .def("phases", &Engine::phases)
      .def("set_phases", &Engine::set_phases)
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("set_threads", &Engine::set_threads)
      .def("generate", &Engine::generate, py::call_guard<py::gil_scoped_release>());
  m.def("sample", &sashimi_step::sample, py::call_guard<py::gil_scoped_release>());
}
