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
//   * S4 state (B, H, n) complex64 as s4lib's default_state (viewed as float32 (B, H, 2n)): the state
//     tensors Python sees; the step runs on the engine's own copy tiled over channels
//     (s4_layer_step.h, TiledSSM: refresh() loads the tensors into it, export_states() writes it back);
//     DownPool buffer (B, p, Hp); UpPool pending (B, p * Hp).
//
// Threads, two ways (set_threads / set_split; results are bitwise the same for any count and either way):
//   * rows: rows are independent sequences, so a batch is split into one contiguous slice of rows per
//     thread (at::parallel_for), and each thread runs whole steps (and, in generate(), the whole
//     sampling loop) on its slice without synchronising; every thread reads all the parameters.
//   * columns (small batches, batch 1): two members of a persistent team (kernels/step_team.h) run
//     every step together on all rows. Every SSM's channels and every Linear's inputs are cut in two
//     halves (whole VL panels); member g steps the SSM tiles of half g and computes the partial sum of
//     each Linear over the inputs of half g (the output Linear of an S4 block reads exactly the SSM
//     channels the member computed; the second Linear of an FF block the hidden units it computed).
//     After one barrier per block each member adds bias + part 0 + part 1 (in that order) into its own
//     copy of the activations, so LayerNorm, GLU, residuals and sampling need no further barrier
//     (both members sample the same token from the same logits). One thread computes the two halves
//     one after the other, in the same order: the same numbers.
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
      Ctx c = context(part, r0, R);
      forward_rows(tok + r0, phase.data(), c);
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
        Ctx c = context(part, r0, R);
        float* x0 = mine(x0_, H0p_, c);
        copy_cols(x0, H0p_, in + r0 * H0, H0, R, 0, H0);
        float* yl = level_step(0, x0, phase.data(), c);
        if (has_out_norm_) {
          float* z = mine(levels_[0].z, H0p_, c);
          layer_norm(yl, R, head_norm_, z);
          yl = z;
        }
        if (c.mi == 0) copy_cols(out + r0 * H0, H0, yl, H0p_, R, 0, H0);
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
      Ctx c = context(part, r0, R);
      SampleScratch scratch;
      // every member samples every row (the same logits, the same rule: the same tokens), so the
      // next step needs no barrier; member 0 writes the results
      std::vector<int64_t> mine_tokens(current.begin() + r0, current.begin() + r0 + R);
      const float* logits = mine(logits_, head_.out, c);
      for (int64_t t = t0; t < t1; ++t) {
        forward_rows(mine_tokens.data(), phase.data(), c);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t b = r0 + r;
          double lp;
          const int64_t chosen = sample_row(logits + r * head_.out, V_, u[b * n + t], temperature, top_k, top_p,
                                            scratch, &lp);
          if (c.mi == 0) tok_out[b * n + t] = chosen, lp_out[b * n + t] = lp;
          mine_tokens[r] = chosen;
        }
      }
      if (c.mi == 0) std::copy(mine_tokens.begin(), mine_tokens.end(), current.begin() + r0);
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
    sync_copies();
    Team::instance().run((int)std::min<int64_t>(T, kHalves), [&](const Part& part) {
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

  static void copy_cols(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t R, int64_t c0, int64_t c1) {
    if (c1 > c0)
      for (int64_t r = 0; r < R; ++r) std::memcpy(dst + r * ldd + c0, src + r * lds + c0, (c1 - c0) * sizeof(float));
  }
  // y += a on columns [c0, c1) (multiples of VL) of R rows of width ld
  static void add_cols(float* y, const float* a, int64_t ld, int64_t R, int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = c0; h < c1; h += VL) vstore(y + r * ld + h, vload(y + r * ld + h) + vload(a + r * ld + h));
  }

  // What one member computes of a step: rows [r0, r0 + R), its copy mi of the scratch, the halves
  // [g0, g1) of every split operation, and the set of partial sums in use (alternating at each barrier:
  // a member that runs ahead writes the other set while its partner still reads this one).
  struct Ctx {
    const Part& part;
    int64_t r0, R;
    int mi, g0, g1;
    int set = 0;
  };
  static Ctx context(const Part& part, int64_t r0, int64_t R) {
    if (part.T > 1) return Ctx{part, r0, R, part.m, part.m, part.m + 1};
    return Ctx{part, r0, R, 0, 0, (int)kHalves};
  }
  static std::pair<int64_t, int64_t> half(int64_t units, int g) { return {units * g / kHalves, units * (g + 1) / kHalves}; }
  float* mine(Scratch& s, int64_t width, const Ctx& c) const { return s.data + (c.mi * B_ + c.r0) * width; }
  float* part_buf(const Ctx& c, int g) const { return parts_.data + ((c.set * kHalves + g) * B_ + c.r0) * part_width_; }

  // The partial sum of L's inputs in half g (in whole VL panels of `units` = L.in / VL) into part g.
  void split_part(const Ctx& c, int g, const float* x, int64_t ldx, const Linear& L) const {
    const auto [k0, k1] = half(L.in / VL, g);
    gemm_part(x, ldx, c.R, L, part_buf(c, g), part_width_, k0 * VL, k1 * VL);
  }
  // out (R, ldo) = (ACC: out +) ((bias + part 0) + part 1), once every member has written its parts.
  template <bool ACC>
  void join(Ctx& c, const Linear& L, float* out, int64_t ldo) {
    c.part.sync();
    const float* p0 = part_buf(c, 0);
    const float* p1 = part_buf(c, 1);
    for (int64_t r = 0; r < c.R; ++r)
      for (int64_t h = 0; h < L.out; h += VL) {
        const vf v = (vload(L.b + h) + vload(p0 + r * part_width_ + h)) + vload(p1 + r * part_width_ + h);
        float* o = out + r * ldo + h;
        vstore(o, ACC ? vload(o) + v : v);
      }
    c.set ^= 1;
  }

  // One step: tokens -> this member's copy of the logits rows.
  void forward_rows(const int64_t* tokens, int64_t* phase, Ctx& c) {
    float* x = mine(x0_, H0p_, c);
    for (int64_t r = 0; r < c.R; ++r) std::memcpy(x + r * H0p_, embedding_ + tokens[r] * H0p_, H0p_ * sizeof(float));
    float* y = level_step(0, x, phase, c);
    float* z = mine(levels_[0].z, H0p_, c);
    layer_norm(y, c.R, head_norm_, z);
    for (int g = c.g0; g < c.g1; ++g) split_part(c, g, z, H0p_, head_);
    join<false>(c, head_, mine(logits_, head_.out, c), head_.out);
  }

  // x (R rows of Hp, this member's copy) through one block; one barrier (in join).
  void block_step(const Block& blk, float* x, Level& lv, Ctx& c) {
    const int64_t Hp = lv.Hp, P = Hp / VL, R = c.R;
    float* z = mine(lv.z, Hp, c);
    float* s = mine(lv.s, Hp, c);
    float* big = mine(lv.big, lv.big_width, c);
    const float* in = x;
    if (blk.prenorm) {
      layer_norm(x, R, blk.norm, z);
      in = z;
    }
    if (blk.stateful) {
      for (int g = c.g0; g < c.g1; ++g) {  // the SSM channels of half g, then their part of the output Linear
        const auto [t0, t1] = half(P, g);
        ssm_tiled(blk.tiled, in, Hp, blk.tstate + c.r0 * blk.tiled.state_floats(),
                  blk.taux + c.r0 * blk.tiled.aux_floats(), s, Hp, R, t0, t1);
        split_part(c, g, s, Hp, blk.out);
      }
      join<false>(c, blk.out, big, lv.big_width);
      glu_rows<true>(big, lv.big_width, Hp, x, Hp, R);  // x += GLU(big) = a * sigmoid(b)
    } else {
      for (int g = c.g0; g < c.g1; ++g) {  // hidden units of half g, then their part of the second Linear
        const auto [f0, f1] = half(blk.ff1.out / VL, g);
        gemm<false>(in, Hp, R, blk.ff1, big, lv.big_width, f0, f1);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t h = f0 * VL; h < f1 * VL; h += VL)
            vstore(big + r * lv.big_width + h, vgelu(vload(big + r * lv.big_width + h)));
        split_part(c, g, big, lv.big_width, blk.ff2);
      }
      join<true>(c, blk.ff2, x, Hp);
    }
    if (!blk.prenorm) {
      layer_norm(x, R, blk.norm, z);
      copy_cols(x, Hp, z, Hp, R, 0, Hp);
    }
  }

  // Level i on input x (R rows of Hp floats, this member's copy); returns the output rows (in this
  // member's scratch). Every member runs the same control flow on the whole width.
  float* level_step(size_t i, float* x, int64_t* phase, Ctx& c) {
    Level& lv = levels_[i];
    const int64_t Hp = lv.Hp, R = c.R, n = R * Hp;
    float* y = mine(lv.y, Hp, c);
    if (lv.p == 0) {  // centre: blocks(x) + x
      copy_cols(y, Hp, x, Hp, R, 0, Hp);
      for (const Block& blk : lv.up) block_step(blk, y, lv, c);
      add_cols(y, x, Hp, R, 0, Hp);
      return y;
    }
    const bool unet = !lv.down.empty();
    const int64_t ns = (int64_t)lv.down.size() + 1;
    float* skips = lv.skips.data + (c.mi * B_ + c.r0) * Hp * ns;  // ns slices of (R, Hp)
    float* buffer = (c.mi == 0 ? lv.buffer : lv.buffer1.data) + c.r0 * lv.p * Hp;
    float* pending = (c.mi == 0 ? lv.pending : lv.pending1.data) + c.r0 * lv.p * Hp;
    if (unet) {
      copy_cols(skips, Hp, x, Hp, R, 0, Hp);
      for (size_t j = 0; j < lv.down.size(); ++j) {
        float* next = skips + (j + 1) * n;
        copy_cols(next, Hp, skips + j * n, Hp, R, 0, Hp);
        block_step(lv.down[j], next, lv, c);
      }
      x = skips + (ns - 1) * n;
    }
    // up path from the pending outputs of the previous coarse step
    const int64_t ph = phase[i];
    copy_cols(y, Hp, pending + ph * Hp, lv.p * Hp, R, 0, Hp);
    if (unet) {
      int64_t top = ns - 1;
      add_cols(y, skips + top-- * n, Hp, R, 0, Hp);
      for (const Block& blk : lv.up) {
        block_step(blk, y, lv, c);
        add_cols(y, skips + top-- * n, Hp, R, 0, Hp);
      }
    } else {
      float* u = mine(lv.u, Hp, c);
      add_cols(y, x, Hp, R, 0, Hp);
      copy_cols(u, Hp, y, Hp, R, 0, Hp);
      for (const Block& blk : lv.up) block_step(blk, y, lv, c);
      add_cols(y, u, Hp, R, 0, Hp);
    }
    // the DownPool takes x; on its p-th input it fires and the coarser level runs
    copy_cols(buffer + ph * Hp, lv.p * Hp, x, Hp, R, 0, Hp);
    if (++phase[i] == lv.p) {
      phase[i] = 0;
      const int64_t Hn = levels_[i + 1].Hp;
      float* coarse = mine(lv.coarse, Hn, c);
      for (int g = c.g0; g < c.g1; ++g) split_part(c, g, buffer, lv.p * Hp, lv.down_pool);
      join<false>(c, lv.down_pool, coarse, Hn);
      float* out = level_step(i + 1, coarse, phase, c);
      for (int g = c.g0; g < c.g1; ++g) split_part(c, g, out, Hn, lv.up_pool);
      join<false>(c, lv.up_pool, pending, lv.p * Hp);
    }
    return y;
  }

  // Member 1's copies of the pooling buffers from the official ones (before a split step: the steps
  // before may have run on one thread).
  void sync_copies() {
    for (Level& lv : levels_)
      if (lv.p > 0) {
        std::memcpy(lv.buffer1.data, lv.buffer, B_ * lv.p * lv.Hp * sizeof(float));
        std::memcpy(lv.pending1.data, lv.pending, B_ * lv.p * lv.Hp * sizeof(float));
      }
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
