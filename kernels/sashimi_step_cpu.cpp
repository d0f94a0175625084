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
// the same code as s4lib's fused FFTConv / S4Block step; GEMM and LayerNorm are in kernels/step_simd.h
// and the sampling rule in kernels/sashimi_sampling.h.
//
// Layout conventions (all float32, C-contiguous, produced by fast_step.py):
//   * an activation of width H is stored padded to Hp = roundup(H, 16) floats per row, padding zero;
//     every padded parameter (biases, norms, SSM planes, packed weight rows/columns) is zero, so the
//     padding stays exactly zero through every operation;
//   * a Linear is packed into panels of 16 output columns: w[(j * in + k) * 16 + c] = W[16 j + c, k]
//     with `in` the padded input width and out = 16 * panels the padded output width;
//   * S4 state (B, H, n) complex64 as s4lib's default_state (viewed as float32 (B, H, 2n)), DPLR
//     auxiliaries (B, H, 2r); DownPool buffer (B, p, Hp); UpPool pending (B, p * Hp).
//
// Batches: rows are independent sequences, so B > 1 is split into one contiguous slice of rows per
// thread (at::parallel_for, i.e. torch.set_num_threads), and each thread runs whole steps (and, in
// generate(), the whole sampling loop) on its slice without synchronising. Linear layers are small
// GEMMs with register tiles of up to 8 rows x 8 vectors.
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
#include "sashimi_sampling.h"
#include "step_simd.h"

namespace sashimi_step {

using namespace s4step;

// ------------------------------------------------------------------------------------- blocks
struct Block {
  bool stateful = false, prenorm = true;
  Norm norm;
  int64_t H = 0, Hp = 0;
  // S4
  SSM ssm;
  Linear out;              // H -> 2H (GLU halves at [0, Hp) and [Hp, 2 Hp))
  float* state = nullptr;  // (B, H, 2n)
  float* aux = nullptr;    // (B, H, 2 rank)
  // FF
  Linear ff1, ff2;
};

// ------------------------------------------------------------------------------------- engine
struct Level {
  int64_t p = 0, H = 0, Hp = 0;  // p = 0: the centre
  std::vector<Block> down, up;   // the centre's blocks are in `up`
  Linear down_pool, up_pool;
  float* buffer = nullptr;   // (B, p, Hp)
  float* pending = nullptr;  // (B, p * Hp)
  // scratch, B rows each
  Scratch z, s, big, u, y, skips, coarse;
  int64_t big_width = 0;
};

class Engine {
 public:
  Engine(int64_t batch, int64_t n_classes, at::Tensor embedding) : B_(batch), V_(n_classes) {
    TORCH_CHECK(batch >= 1, "sashimi_step: batch size must be >= 1, got ", batch);
    check(embedding, "embedding", 2);
    TORCH_CHECK(embedding.size(0) == n_classes && embedding.size(1) % VL == 0,
                "sashimi_step: embedding must be (n_classes, padded d_model), got ", embedding.sizes());
    embedding_ = keep(embedding);
    H0p_ = embedding.size(1);
  }

  void add_level(int64_t pool, int64_t width, at::Tensor down_w, at::Tensor down_b, at::Tensor up_w,
                 at::Tensor up_b, at::Tensor buffer, at::Tensor pending) {
    TORCH_CHECK(!finalized_ && !has_center_, "sashimi_step: add_level after the centre");
    Level lv;
    lv.p = pool, lv.H = width, lv.Hp = padded(width);
    TORCH_CHECK(pool >= 1, "sashimi_step: pool must be >= 1");
    lv.down_pool = linear(down_w, down_b, pool * lv.Hp, -1);
    lv.up_pool = linear(up_w, up_b, -1, pool * lv.Hp);
    check(buffer, "buffer", 3);
    check(pending, "pending", 2);
    TORCH_CHECK(buffer.size(0) == B_ && buffer.size(1) == pool && buffer.size(2) == lv.Hp, "sashimi_step: bad buffer shape");
    TORCH_CHECK(pending.size(0) == B_ && pending.size(1) == pool * lv.Hp, "sashimi_step: bad pending shape");
    lv.buffer = keep(buffer);
    lv.pending = keep(pending);
    levels_.push_back(std::move(lv));
  }

  void set_center(int64_t width) {
    TORCH_CHECK(!has_center_, "sashimi_step: centre set twice");
    Level c;
    c.p = 0, c.H = width, c.Hp = padded(width);
    levels_.push_back(std::move(c));
    has_center_ = true;
  }

  // group: 0 = down path of `level`, 1 = up path of `level` (or the centre's blocks)
  // ssm / chan: s4lib.fused_step.pack_ssm's (H, planes, npad) and (H, chans); state complex64 (B, H, n)
  // (the engine's state memory, written from outside only before refresh()); aux float32 (B, H, 2 rank).
  void add_s4_block(int64_t group, int64_t level, bool prenorm, at::Tensor norm_w, at::Tensor norm_b, double eps,
                    int64_t kind, int64_t rank, int64_t n, at::Tensor ssm, at::Tensor chan, at::Tensor out_w,
                    at::Tensor out_b, at::Tensor state, at::Tensor aux) {
    Level& lv = level_at(level);
    Block blk;
    blk.stateful = true;
    blk.prenorm = prenorm;
    blk.H = lv.H, blk.Hp = lv.Hp;
    blk.norm = norm(norm_w, norm_b, eps, lv);
    blk.ssm = make_ssm(kind, rank, n, kGELU, ssm, chan);
    TORCH_CHECK(blk.ssm.H == lv.H, "sashimi_step: SSM of width ", blk.ssm.H, " at a level of width ", lv.H);
    kept_.push_back(ssm), kept_.push_back(chan);
    blk.out = linear(out_w, out_b, lv.Hp, 2 * lv.Hp);
    TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kComplexFloat && state.is_contiguous() &&
                    state.sizes() == at::IntArrayRef({B_, lv.H, n}),
                "sashimi_step: state must be contiguous complex64 (", B_, ", ", lv.H, ", ", n, "), got ", state.sizes());
    kept_.push_back(state);
    blk.state = reinterpret_cast<float*>(state.data_ptr<c10::complex<float>>());
    if (blk.ssm.rank > 0) {
      check(aux, "aux", 3);
      TORCH_CHECK(aux.size(0) == B_ && aux.size(1) == lv.H && aux.size(2) == 2 * blk.ssm.rank,
                  "sashimi_step: bad aux shape ", aux.sizes());
      blk.aux = keep(aux);
    }
    (group == 0 ? lv.down : lv.up).push_back(blk);
  }

  // Recompute the DPLR auxiliaries from the states (call after writing the state tensors).
  void refresh() {
    for (auto& lv : levels_)
      for (auto* group : {&lv.down, &lv.up})
        for (auto& blk : *group)
          if (blk.stateful) ssm_refresh(blk.ssm, blk.state, blk.aux, B_);
  }

  void add_ff_block(int64_t group, int64_t level, bool prenorm, at::Tensor norm_w, at::Tensor norm_b, double eps,
                    at::Tensor w1, at::Tensor b1, at::Tensor w2, at::Tensor b2) {
    Level& lv = level_at(level);
    Block blk;
    blk.prenorm = prenorm;
    blk.H = lv.H, blk.Hp = lv.Hp;
    blk.norm = norm(norm_w, norm_b, eps, lv);
    blk.ff1 = linear(w1, b1, lv.Hp, -1);
    blk.ff2 = linear(w2, b2, blk.ff1.out, lv.Hp);
    (group == 0 ? lv.down : lv.up).push_back(blk);
  }

  void set_head(at::Tensor norm_w, at::Tensor norm_b, double eps, at::Tensor w, at::Tensor b) {
    TORCH_CHECK(!levels_.empty(), "sashimi_step: set_head after the levels");
    head_norm_ = norm(norm_w, norm_b, eps, levels_[0]);
    head_ = linear(w, b, H0p_, -1);
    TORCH_CHECK(head_.out >= V_, "sashimi_step: head narrower than n_classes");
  }

  // Backbone-only engines (n_classes = 0, no head): the output LayerNorm, if any, of step_features().
  void set_output_norm(bool has_norm, at::Tensor norm_w, at::Tensor norm_b, double eps) {
    TORCH_CHECK(!levels_.empty() && V_ == 0, "sashimi_step: set_output_norm is for backbone-only engines");
    has_out_norm_ = has_norm;
    if (has_norm) head_norm_ = norm(norm_w, norm_b, eps, levels_[0]);
  }

  void finalize() {
    TORCH_CHECK(has_center_ && (head_.w != nullptr || V_ == 0), "sashimi_step: incomplete model (centre or head missing)");
    TORCH_CHECK(levels_[0].Hp == H0p_, "sashimi_step: embedding width differs from level 0");
    for (size_t i = 0; i + 1 < levels_.size(); ++i) {
      Level& lv = levels_[i];
      TORCH_CHECK(lv.down_pool.out == levels_[i + 1].Hp && lv.up_pool.in == levels_[i + 1].Hp,
                  "sashimi_step: pooling widths disagree between levels ", i, " and ", i + 1);
      TORCH_CHECK(lv.down.size() == lv.up.size() || lv.down.empty(), "sashimi_step: U-Net levels need as many "
                  "down blocks as up blocks");
    }
    for (auto& lv : levels_) {
      lv.big_width = 2 * lv.Hp;
      for (auto* group : {&lv.down, &lv.up})
        for (auto& blk : *group)
          if (!blk.stateful) lv.big_width = std::max(lv.big_width, blk.ff1.out);
      for (auto* buf : {&lv.z, &lv.s, &lv.u, &lv.y}) buf->resize(B_ * lv.Hp);
      lv.big.resize(B_ * lv.big_width);
      lv.skips.resize(B_ * lv.Hp * (int64_t)(lv.down.size() + 1));
    }
    for (size_t i = 0; i + 1 < levels_.size(); ++i) levels_[i].coarse.resize(B_ * levels_[i + 1].Hp);
    x0_.resize(B_ * H0p_);
    logits_.resize(B_ * head_.out);
    phase_.assign(levels_.size() - 1, 0);
    finalized_ = true;
  }

  std::vector<int64_t> phases() const { return phase_; }

  void set_phases(std::vector<int64_t> phases) {
    TORCH_CHECK(phases.size() == phase_.size(), "sashimi_step: expected ", phase_.size(), " phases");
    for (size_t i = 0; i < phases.size(); ++i)
      TORCH_CHECK(phases[i] >= 0 && phases[i] < levels_[i].p, "sashimi_step: phase ", phases[i],
                  " out of range for pool ", levels_[i].p);
    phase_ = std::move(phases);
  }

  // logits (B, n_classes) float32 for tokens (B,) int64.
  void step(at::Tensor tokens, at::Tensor logits) {
    TORCH_CHECK(finalized_, "sashimi_step: finalize() first");
    check_tokens(tokens, 1);
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2 &&
                logits.size(0) == B_ && logits.size(1) == V_, "sashimi_step: logits must be float32 (B, V)");
    const int64_t* tok = tokens.data_ptr<int64_t>();
    float* out = logits.data_ptr<float>();
    parallel_rows([&](int64_t r0, int64_t R) {
      FlushDenormals flush;
      std::vector<int64_t> phase = phase_;
      forward_rows(tok + r0, r0, R, phase.data());
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(out + (r0 + r) * V_, logits_.data + (r0 + r) * head_.out, V_ * sizeof(float));
    });
    advance_phases(1);
  }

  // Tensors whose version counters and data pointers signature() sums (the parameters an engine was built from).
  void watch(std::vector<at::Tensor> tensors) { watched_ = std::move(tensors); }
  std::vector<int64_t> signature() const {
    int64_t versions = 0, pointers = 0;
    for (const auto& t : watched_) {
      versions += t.is_inference() ? 0 : (int64_t)t._version();  // inference tensors have no counter
      pointers += (int64_t)reinterpret_cast<uintptr_t>(t.data_ptr());
    }
    return {versions, pointers};
  }

  // Backbone-only step: features x (B, H0) float32 -> (y (B, H0) after the output norm if any, copies of
  // the S4 states of the levels that ran (level 0's down and up blocks, level 1's, ..., the centre's),
  // the number of levels that ran (the centre counts as one), the buffer slot the last of them wrote).
  std::tuple<at::Tensor, std::vector<at::Tensor>, int64_t, int64_t> step_features(at::Tensor x, int64_t threads) {
    const int64_t H0 = levels_[0].H;
    at::Tensor y = at::empty({B_, H0}, x.options());
    TORCH_CHECK(finalized_ && V_ == 0, "sashimi_step: step_features needs a finalized backbone-only engine");
    for (const at::Tensor* t : {&x, &y})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                  t->size(0) == B_ && t->size(1) == H0, "sashimi_step: features must be contiguous float32 (",
                  B_, ", ", H0, "), got ", t->sizes());
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    parallel_rows([&](int64_t r0, int64_t R) {
      FlushDenormals flush;
      std::vector<int64_t> phase = phase_;
      float* x0 = x0_.data + r0 * H0p_;
      for (int64_t r = 0; r < R; ++r) std::memcpy(x0 + r * H0p_, in + (r0 + r) * H0, H0 * sizeof(float));
      float* yl = level_step(0, x0, r0, R, phase.data());
      if (has_out_norm_) {
        float* z = levels_[0].z.data + r0 * H0p_;
        layer_norm(yl, R, head_norm_, z);
        yl = z;
      }
      for (int64_t r = 0; r < R; ++r) std::memcpy(out + (r0 + r) * H0, yl + r * H0p_, H0 * sizeof(float));
    }, threads);
    int64_t ran = 1;  // levels that ran this step: level i + 1 ran iff level i fired
    while (ran < (int64_t)levels_.size() && phase_[ran - 1] == levels_[ran - 1].p - 1) ++ran;
    const int64_t slot = ran <= (int64_t)phase_.size() ? phase_[ran - 1] : -1;
    advance_phases(1);
    std::vector<at::Tensor> copies;
    for (int64_t i = 0; i < ran; ++i)
      for (auto* group : {&levels_[i].down, &levels_[i].up})
        for (const Block& blk : *group)
          if (blk.stateful) {
            at::Tensor t = at::empty({B_, blk.H, blk.ssm.n}, at::TensorOptions().dtype(at::kComplexFloat));
            std::memcpy(t.data_ptr(), blk.state, B_ * blk.H * 2 * blk.ssm.n * sizeof(float));
            copies.push_back(t);
          }
    return {y, copies, ran, slot};
  }

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
    parallel_rows([&](int64_t r0, int64_t R) {
      FlushDenormals flush;
      std::vector<int64_t> phase = phase_;
      std::vector<int64_t> current(first_tok + r0, first_tok + r0 + R);
      SampleScratch scratch;
      for (int64_t t = 0; t < n; ++t) {
        forward_rows(current.data(), r0, R, phase.data());
        for (int64_t r = 0; r < R; ++r) {
          const int64_t b = r0 + r;
          double lp;
          const int64_t chosen = sample_row(logits_.data + b * head_.out, V_, u[b * n + t], temperature, top_k,
                                            top_p, scratch, &lp);
          tok_out[b * n + t] = chosen;
          lp_out[b * n + t] = lp;
          current[r] = chosen;
        }
      }
    });
    advance_phases(n);
  }

 private:
  int64_t B_, V_, H0p_ = 0;
  std::vector<at::Tensor> kept_;  // every tensor whose memory the engine reads or writes
  float* embedding_ = nullptr;
  std::vector<Level> levels_;     // pooling levels, then the centre
  bool has_center_ = false, finalized_ = false, has_out_norm_ = false;
  std::vector<at::Tensor> watched_;
  Norm head_norm_;
  Linear head_;
  Scratch x0_, logits_;
  std::vector<int64_t> phase_;    // per pooling level: inputs waiting in its DownPool (shared by all rows)

  static int64_t padded(int64_t h) { return (h + VL - 1) / VL * VL; }

  static void check(const at::Tensor& t, const char* name, int64_t dim) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
                "sashimi_step: ", name, " must be a contiguous float32 CPU tensor with ", dim, " dims, got ",
                t.scalar_type(), " ", t.sizes());
  }

  void check_tokens(const at::Tensor& t, int64_t dim) const {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == dim &&
                t.size(0) == B_, "sashimi_step: tokens must be a contiguous int64 tensor of shape (", B_, ")");
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B_; ++b)
      TORCH_CHECK(p[b] >= 0 && p[b] < V_, "sashimi_step: token ", p[b], " outside [0, ", V_, ")");
  }

  float* keep(const at::Tensor& t) {
    kept_.push_back(t);
    return t.data_ptr<float>();
  }

  const float* vec(const at::Tensor& t, int64_t n, const char* name) {
    check(t, name, 1);
    TORCH_CHECK(t.size(0) == n, "sashimi_step: ", name, " must have ", n, " entries, got ", t.size(0));
    return keep(t);
  }

  Linear linear(const at::Tensor& w, const at::Tensor& b, int64_t in, int64_t out) {
    check(w, "packed weight", 3);
    TORCH_CHECK(w.size(2) == VL, "sashimi_step: packed weights have panels of ", VL, " columns");
    Linear L;
    L.in = w.size(1), L.out = w.size(0) * VL;
    TORCH_CHECK(in < 0 || L.in == in, "sashimi_step: linear input width ", L.in, ", expected ", in);
    TORCH_CHECK(out < 0 || L.out == out, "sashimi_step: linear output width ", L.out, ", expected ", out);
    L.w = keep(w);
    L.b = vec(b, L.out, "bias");
    return L;
  }

  Norm norm(const at::Tensor& g, const at::Tensor& b, double eps, const Level& lv) {
    Norm n;
    n.H = lv.H, n.Hp = lv.Hp, n.eps = (float)eps;
    n.g = vec(g, lv.Hp, "norm weight");
    n.b = vec(b, lv.Hp, "norm bias");
    return n;
  }

  Level& level_at(int64_t level) {
    TORCH_CHECK(!finalized_ && level >= 0 && level < (int64_t)levels_.size(), "sashimi_step: no level ", level);
    return levels_[level];
  }

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

  void advance_phases(int64_t steps) {
    for (int64_t t = 0; t < steps; ++t) {
      for (size_t i = 0; i < phase_.size(); ++i) {
        if (++phase_[i] < levels_[i].p) break;
        phase_[i] = 0;  // level i fired: level i + 1 takes a step
      }
    }
  }

  // One step for rows [r0, r0 + R): tokens -> logits_ rows.
  void forward_rows(const int64_t* tokens, int64_t r0, int64_t R, int64_t* phase) {
    float* x = x0_.data + r0 * H0p_;
    for (int64_t r = 0; r < R; ++r) std::memcpy(x + r * H0p_, embedding_ + tokens[r] * H0p_, H0p_ * sizeof(float));
    float* y = level_step(0, x, r0, R, phase);
    float* z = levels_[0].z.data + r0 * H0p_;
    layer_norm(y, R, head_norm_, z);
    gemm<false>(z, H0p_, R, head_, logits_.data + r0 * head_.out, head_.out);
  }

  void block_step(const Block& blk, float* x, int64_t r0, int64_t R, Level& lv) {
    const int64_t Hp = lv.Hp;
    float* z = lv.z.data + r0 * Hp;
    float* s = lv.s.data + r0 * Hp;
    float* big = lv.big.data + r0 * lv.big_width;
    const float* in = x;
    if (blk.prenorm) {
      layer_norm(x, R, blk.norm, z);
      in = z;
    }
    if (blk.stateful) {
      const int64_t per_row = blk.H * 2 * blk.ssm.n;
      float* x_state = blk.state + r0 * per_row;
      ssm_rows(blk.ssm, in, Hp, x_state, x_state, blk.aux ? blk.aux + r0 * blk.H * 2 * blk.ssm.rank : nullptr, true,
               s, Hp, R);
      gemm<false>(s, Hp, R, blk.out, big, lv.big_width);
      glu_rows<true>(big, lv.big_width, Hp, x, Hp, R);  // x += GLU(big) = a * sigmoid(b)
    } else {
      const int64_t W = blk.ff1.out;
      gemm<false>(in, Hp, R, blk.ff1, big, lv.big_width);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t h = 0; h < W; h += VL) vstore(big + r * lv.big_width + h, vgelu(vload(big + r * lv.big_width + h)));
      gemm<true>(big, lv.big_width, R, blk.ff2, x, Hp);
    }
    if (!blk.prenorm) layer_norm(x, R, blk.norm, x);
  }

  static void add_rows(float* y, const float* a, int64_t n) {
    for (int64_t h = 0; h < n; h += VL) vstore(y + h, vload(y + h) + vload(a + h));
  }

  // Level i on input x (R rows of Hp floats); returns the output rows (in this level's scratch).
  float* level_step(size_t i, float* x, int64_t r0, int64_t R, int64_t* phase) {
    Level& lv = levels_[i];
    const int64_t Hp = lv.Hp, n = R * Hp;
    float* y = lv.y.data + r0 * Hp;
    if (lv.p == 0) {  // centre: blocks(x) + x
      std::memcpy(y, x, n * sizeof(float));
      for (const Block& blk : lv.up) block_step(blk, y, r0, R, lv);
      add_rows(y, x, n);
      return y;
    }
    const bool unet = !lv.down.empty();
    const int64_t ns = (int64_t)lv.down.size() + 1;
    float* skips = lv.skips.data + r0 * Hp * ns;  // ns slices of (R, Hp)
    if (unet) {
      std::memcpy(skips, x, n * sizeof(float));
      for (size_t j = 0; j < lv.down.size(); ++j) {
        float* next = skips + (j + 1) * n;
        std::memcpy(next, skips + j * n, n * sizeof(float));
        block_step(lv.down[j], next, r0, R, lv);
      }
      x = skips + (ns - 1) * n;
    }
    // up path from the pending outputs of the previous coarse step
    const int64_t ph = phase[i];
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(y + r * Hp, lv.pending + (r0 + r) * lv.p * Hp + ph * Hp, Hp * sizeof(float));
    if (unet) {
      int64_t top = ns - 1;
      add_rows(y, skips + top-- * n, n);
      for (const Block& blk : lv.up) {
        block_step(blk, y, r0, R, lv);
        add_rows(y, skips + top-- * n, n);
      }
    } else {
      float* u = lv.u.data + r0 * Hp;
      add_rows(y, x, n);
      std::memcpy(u, y, n * sizeof(float));
      for (const Block& blk : lv.up) block_step(blk, y, r0, R, lv);
      add_rows(y, u, n);
    }
    // the DownPool takes x; on its p-th input it fires and the coarser level runs
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(lv.buffer + (r0 + r) * lv.p * Hp + ph * Hp, x + r * Hp, Hp * sizeof(float));
    if (++phase[i] == lv.p) {
      phase[i] = 0;
      const int64_t Hn = levels_[i + 1].Hp;
      float* coarse = lv.coarse.data + r0 * Hn;
      gemm<false>(lv.buffer + r0 * lv.p * Hp, lv.p * Hp, R, lv.down_pool, coarse, Hn);
      float* c = level_step(i + 1, coarse, r0, R, phase);
      gemm<false>(c, Hn, R, lv.up_pool, lv.pending + r0 * lv.p * Hp, lv.p * Hp);
    }
    return y;
  }

 public:
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
      .def("step_features", &Engine::step_features, py::call_guard<py::gil_scoped_release>())
      .def("watch", &Engine::watch)
      .def("signature", &Engine::signature)
      .def("finalize", &Engine::finalize)
      .def("refresh", &Engine::refresh)
      .def("phases", &Engine::phases)
      .def("set_phases", &Engine::set_phases)
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("generate", &Engine::generate, py::call_guard<py::gil_scoped_release>());
  m.def("sample", &sashimi_step::sample, py::call_guard<py::gil_scoped_release>());
}
