// The WaveformAR / SaShiMi engine's model: its levels and blocks, built from packed tensors (sashimi_step_cpu.cpp).
//
// EngineModel holds the parameters and the state memory that sashimi/nn/fused_backbone.py exports
// (layouts: sashimi_step_cpu.cpp's header comment) and checks them as they are added; the Engine
// (sashimi_step_cpu.cpp) adds the step, the threads and the sampling loop.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "s4_layer_step.h"
#include "step_simd.h"

namespace sashimi_step {

using namespace s4step;

// A step split over the columns runs on two team members: each owns one half of the channels of every
// SSM and one half of the inputs of every Linear (a Linear's two partial sums are added, with the bias,
// by each member into its own copy of the activations), so a block needs one barrier. One thread
// computes the same two halves one after the other: the results do not depend on the thread count.
constexpr int64_t kHalves = 2;
constexpr int64_t kMaxMembers = 8;  // threads a step of many rows is split into (by rows)

// ------------------------------------------------------------------------------------- blocks
struct Block {
  bool stateful = false, prenorm = true;
  Norm norm;
  int64_t H = 0, Hp = 0;
  // S4
  SSM ssm;                 // as packed (the layout of s4lib's layer step)
  TiledSSM tiled;          // the same parameters in tiles of VL channels: what the step runs
  Linear out;              // H -> 2H (GLU halves at [0, Hp) and [Hp, 2 Hp))
  float* state = nullptr;  // (B, H, 2n): the complex state tensor (imported by refresh(), written by export_states())
  float* tstate = nullptr; // (B, tiled.state_floats()): the state the step updates
  float* taux = nullptr;   // (B, tiled.aux_floats()) (DPLR)
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
  Scratch buffer1, pending1; // member 1's copies of buffer and pending (it computes the same values)
  // scratch, kHalves copies (one per member) of B rows each
  Scratch z, s, big, u, y, skips, coarse;
  int64_t big_width = 0;
};

class EngineModel {
 public:
  EngineModel(int64_t batch, int64_t n_classes, at::Tensor embedding) : B_(batch), V_(n_classes) {
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
    const int64_t tiles = lv.Hp / VL;
    blk.tiled = tile_ssm(blk.ssm, tiles, alloc(tiles * n * 2 * blk.ssm.planes * VL), alloc(tiles * blk.ssm.chans * VL));
    blk.tstate = alloc(B_ * blk.tiled.state_floats());
    blk.taux = alloc(B_ * std::max<int64_t>(1, blk.tiled.aux_floats()));
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
      kept_.push_back(aux);  // checked for the interface; the step keeps its auxiliaries in taux
    }
    (group == 0 ? lv.down : lv.up).push_back(blk);
  }

  // Load the state tensors into the step's tiled states and recompute the DPLR auxiliaries (call
  // after writing the state tensors).
  void refresh() {
    for (auto& lv : levels_)
      for (auto* group : {&lv.down, &lv.up})
        for (auto& blk : *group)
          if (blk.stateful) {
            tiled_from_complex(blk.tiled, blk.state, blk.tstate, B_);
            tiled_refresh(blk.tiled, blk.tstate, blk.taux, B_);
          }
  }

  // Write the step's states into the state tensors (levels [0, levels); call before reading them).
  void export_states(int64_t levels = -1) {
    if (levels < 0) levels = (int64_t)levels_.size();
    for (int64_t i = 0; i < std::min<int64_t>(levels, (int64_t)levels_.size()); ++i)
      for (auto* group : {&levels_[i].down, &levels_[i].up})
        for (auto& blk : *group)
          if (blk.stateful) complex_from_tiled(blk.tiled, blk.tstate, blk.state, B_);
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

  // Backbone-only engines (n_classes = 0, no head): the output LayerNorm, if any, of step_dict().
  void set_output_norm(bool has_norm, at::Tensor norm_w, at::Tensor norm_b, double eps) {
    TORCH_CHECK(!levels_.empty() && V_ == 0, "sashimi_step: set_output_norm is for backbone-only engines");
    has_out_norm_ = has_norm;
    if (has_norm) head_norm_ = norm(norm_w, norm_b, eps, levels_[0]);
  }

  void finalize() {
    TORCH_CHECK(has_center_ && (head_.w != nullptr || head_.wh != nullptr || V_ == 0), "sashimi_step: incomplete model (centre or head missing)");
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
      for (auto* buf : {&lv.s, &lv.u, &lv.y, &lv.z}) buf->resize(kHalves * B_ * lv.Hp);
      lv.big.resize(kHalves * B_ * lv.big_width);
      lv.skips.resize(kHalves * B_ * lv.Hp * (int64_t)(lv.down.size() + 1));
      part_width_ = std::max(part_width_, lv.big_width);
      if (lv.p > 0) {
        lv.buffer1.resize(B_ * lv.p * lv.Hp);
        lv.pending1.resize(B_ * lv.p * lv.Hp);
        part_width_ = std::max(part_width_, lv.p * lv.Hp);
      }
    }
    for (size_t i = 0; i + 1 < levels_.size(); ++i) {
      levels_[i].coarse.resize(kHalves * B_ * levels_[i + 1].Hp);
      part_width_ = std::max(part_width_, levels_[i + 1].Hp);
    }
    x0_.resize(kHalves * B_ * H0p_);
    logits_.resize(kHalves * B_ * head_.out);
    part_width_ = std::max(part_width_, head_.out);
    parts_.resize(2 * kHalves * B_ * part_width_);
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

  // Tensors whose version counters and data pointers signature() sums (the parameters an engine was built from).
  void watch(std::vector<at::Tensor> tensors) {
    watched_ = std::move(tensors);
    built_signature_ = signature();
  }
  std::vector<int64_t> signature() const {
    int64_t versions = 0, pointers = 0;
    for (const auto& t : watched_) {
      versions += t.is_inference() ? 0 : (int64_t)t._version();  // inference tensors have no counter
      pointers += (int64_t)reinterpret_cast<uintptr_t>(t.data_ptr());
    }
    return {versions, pointers};
  }

 protected:
  int64_t B_, V_, H0p_ = 0;
  std::vector<at::Tensor> kept_;  // every tensor whose memory the engine reads or writes
  std::vector<Scratch> owned_;    // the engine's own memory (tiled SSM parameters and states)
  float* embedding_ = nullptr;
  std::vector<Level> levels_;     // pooling levels, then the centre
  bool has_center_ = false, finalized_ = false, has_out_norm_ = false;
  std::vector<at::Tensor> watched_;
  std::vector<int64_t> built_signature_ = {0, 0};
  Norm head_norm_;
  Linear head_;
  Scratch x0_, logits_;            // kHalves copies (member 0's first: the official logits)
  Scratch parts_;                  // partial sums of split Linears: [2 alternating sets][kHalves][B][part_width_]
  int64_t part_width_ = 0;
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

  float* alloc(int64_t n) {
    owned_.emplace_back();
    owned_.back().resize(n);
    return owned_.back().data;
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

  // A packed Linear: float32 weights, or float16 ones (reduced-precision storage, float32 arithmetic).
  Linear linear(const at::Tensor& w, const at::Tensor& b, int64_t in, int64_t out) {
    const bool half = w.scalar_type() == at::kHalf;
    if (!half) check(w, "packed weight", 3);
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 3 && w.size(2) == VL,
                "sashimi_step: packed weights must be contiguous (out / ", VL, ", in, ", VL, "), got ", w.sizes());
    Linear L;
    L.in = w.size(1), L.out = w.size(0) * VL;
    TORCH_CHECK(in < 0 || L.in == in, "sashimi_step: linear input width ", L.in, ", expected ", in);
    TORCH_CHECK(out < 0 || L.out == out, "sashimi_step: linear output width ", L.out, ", expected ", out);
    if (half) {
      kept_.push_back(w);
      L.wh = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
    } else {
      L.w = keep(w);
    }
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

};

}  // namespace sashimi_step
