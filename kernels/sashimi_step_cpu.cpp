// Fused CPU inference engine for the WaveformAR recurrent step: sashimi/fast_step.py is its Python side.
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
// SSM steps (complex arithmetic as separate re/im planes; vector lanes run over channels h, so the
// sums over the state index n are plain vertical adds; details at `enum Kind` below):
//   S4D:  x = dA x + dB u;                                      y = 2 Re sum_n C x
//   S4 (DPLR, the Woodbury 'linear' step of rank r, rearranged into one pass over the state):
//         q = 2 Re sum_n Qc x;  y1 = E x - sum_r Pd_r q_r + dtB u;  z = F y1;
//         q2 = 2 Re sum_n Qc z; q3 = M q2;  x = z - sum_r G_r q3_r;  y = 2 Re sum_n C x
//
// Layout conventions (all float32, C-contiguous, produced by fast_step.py):
//   * an activation of width H is stored padded to Hp = roundup(H, 16) floats per row, padding zero;
//     every padded parameter (biases, norms, SSM planes, packed weight rows/columns) is zero, so the
//     padding stays exactly zero through every operation;
//   * a Linear is packed into panels of 16 output columns: w[(j * in + k) * 16 + c] = W[16 j + c, k]
//     with `in` the padded input width and out = 16 * panels the padded output width;
//   * S4 state (B, Hp/16, n, 2, 16); DownPool buffer (B, p, Hp); UpPool pending (B, p * Hp).
//
// Batches: rows are independent sequences, so B > 1 is split into one contiguous slice of rows per
// thread (at::parallel_for, i.e. torch.set_num_threads), and each thread runs whole steps (and, in
// generate(), the whole sampling loop) on its slice without synchronising. Linear layers are small
// GEMMs with register tiles of up to 8 rows x 8 vectors.
//
// The sampling rule of generate() is defined in sashimi/fast_step.py (module docstring) and
// implemented in sample_row() below with the same float64 operations in the same order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace sashimi_step {

constexpr int64_t VL = 16;  // floats per vector (one 512-bit register; two 256-bit ones without AVX-512)
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf_mem __attribute__((vector_size(64), aligned(4), may_alias));

static inline vf vload(const float* p) { return *reinterpret_cast<const vf_mem*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vf_mem*>(p) = v; }
static inline vf vsplat(float x) { return vf{} + x; }
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp(x) for float32 lanes: 2^k exp(r), r = x - k ln2 in [-ln2/2, ln2/2], degree-7 Taylor polynomial
// (relative error ~1e-8 before rounding); x clamped to [-87, 88] (no overflow to inf, no denormals).
static inline vf vexp(vf x) {
  x = vmin(vmax(x, vsplat(-87.0f)), vsplat(88.0f));
  const vf shifter = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf k = (x * 1.44269504088896341f + shifter) - shifter;
  vf r = x - k * 0.693145751953125f;  // ln2 split in a part exact in float and the rest
  r = r - k * 1.42860682030941723212e-6f;
  vf p = vsplat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi e = (__builtin_convertvector(k, vi) + 127) << 23;
  return p * (vf)e;
}

// erf(x) by Abramowitz & Stegun 7.1.26: 1 - (a1 t + ... + a5 t^5) exp(-x^2), t = 1 / (1 + p |x|),
// absolute error <= 1.5e-7; odd extension for x < 0.
static inline vf verf(vf x) {
  const vi bits = (vi)x;
  const vi sign = bits & (int32_t)0x80000000;
  const vf ax = (vf)(bits & 0x7fffffff);
  vf t = 1.0f / (1.0f + 0.3275911f * ax);
  vf poly = vsplat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly = poly * t;
  vf r = 1.0f - poly * vexp(-(ax * ax));
  return (vf)((vi)r | sign);
}

// torch.nn.GELU() (approximate='none'): x/2 (1 + erf(x / sqrt 2)).
static inline vf vgelu(vf x) { return 0.5f * x * (1.0f + verf(x * 0.70710678118654752440f)); }
static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// Denormals cost ~100 cycles each on x86 and decaying SSM states produce them; they are far below
// float32 round-off of every sum they enter. Flush them for the duration of a call.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// 64-byte aligned scratch memory.
struct Scratch {
  float* data = nullptr;
  void resize(int64_t n) {
    std::free(data);
    size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(float) + 63) / 64 * 64;
    data = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data != nullptr, "sashimi_step: out of memory allocating ", bytes, " bytes of scratch");
    std::memset(data, 0, bytes);
  }
  ~Scratch() { std::free(data); }
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch(Scratch&& other) noexcept : data(other.data) { other.data = nullptr; }
};

// ------------------------------------------------------------------------------------------ GEMM
struct Linear {
  const float* w = nullptr;  // packed (out / VL, in, VL)
  const float* b = nullptr;  // (out,)
  int64_t in = 0, out = 0;   // padded widths
};

// y[r, j0*VL : (j0+P)*VL] (+)= x[r, :in] W^T + b for R rows: R x P accumulators stay in registers.
template <int R, int P, bool ACC>
static inline void gemm_tile(const float* __restrict x, int64_t ldx, const Linear& L, int64_t j0,
                             float* __restrict y, int64_t ldy) {
  vf acc[R][P];
  for (int p = 0; p < P; ++p) {
    vf bias = vload(L.b + (j0 + p) * VL);
    for (int r = 0; r < R; ++r) acc[r][p] = ACC ? vload(y + r * ldy + (j0 + p) * VL) + bias : bias;
  }
  const int64_t K = L.in, stride = K * VL;
  const float* __restrict w = L.w + j0 * stride;
  for (int64_t k = 0; k < K; ++k) {
    vf wv[P];
    for (int p = 0; p < P; ++p) wv[p] = vload(w + p * stride + k * VL);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * ldx + k];
      for (int p = 0; p < P; ++p) acc[r][p] += xr * wv[p];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) vstore(y + r * ldy + (j0 + p) * VL, acc[r][p]);
}

template <int R, bool ACC>
static void gemm_rows(const float* x, int64_t ldx, const Linear& L, float* y, int64_t ldy) {
  constexpr int P = R == 1 ? 8 : (R <= 4 ? 4 : 2);
  const int64_t panels = L.out / VL;
  int64_t j = 0;
  for (; j + P <= panels; j += P) gemm_tile<R, P, ACC>(x, ldx, L, j, y, ldy);
  if constexpr (P > 4) {
    for (; j + 4 <= panels; j += 4) gemm_tile<R, 4, ACC>(x, ldx, L, j, y, ldy);
  }
  if constexpr (P > 2) {
    for (; j + 2 <= panels; j += 2) gemm_tile<R, 2, ACC>(x, ldx, L, j, y, ldy);
  }
  for (; j < panels; ++j) gemm_tile<R, 1, ACC>(x, ldx, L, j, y, ldy);
}

// y (rows, out) = x (rows, in) W^T + b, or y += ... (ACC). Row strides ldx, ldy.
template <bool ACC>
static void gemm(const float* x, int64_t ldx, int64_t rows, const Linear& L, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; r += 8) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    switch (std::min<int64_t>(rows - r, 8)) {
      case 1: gemm_rows<1, ACC>(xr, ldx, L, yr, ldy); break;
      case 2: gemm_rows<2, ACC>(xr, ldx, L, yr, ldy); break;
      case 3: gemm_rows<3, ACC>(xr, ldx, L, yr, ldy); break;
      case 4: gemm_rows<4, ACC>(xr, ldx, L, yr, ldy); break;
      case 5: gemm_rows<5, ACC>(xr, ldx, L, yr, ldy); break;
      case 6: gemm_rows<6, ACC>(xr, ldx, L, yr, ldy); break;
      case 7: gemm_rows<7, ACC>(xr, ldx, L, yr, ldy); break;
      default: gemm_rows<8, ACC>(xr, ldx, L, yr, ldy); break;
    }
  }
}

// -------------------------------------------------------------------------------- LayerNorm
struct Norm {
  const float* g = nullptr;  // (Hp,) weight, zero padded
  const float* b = nullptr;  // (Hp,) bias, zero padded
  int64_t H = 0, Hp = 0;
  float eps = 1e-5f;
};

// y = (x - mean) / sqrt(var + eps) * g + b over the first H features of each row (y may be x).
static void layer_norm(const float* x, int64_t rows, const Norm& n, float* y) {
  const int64_t Hp = n.Hp;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * Hp;
    float* yr = y + r * Hp;
    vf s0{}, s1{};
    int64_t h = 0;
    for (; h + 2 * VL <= Hp; h += 2 * VL) {
      s0 += vload(xr + h);
      s1 += vload(xr + h + VL);
    }
    for (; h < Hp; h += VL) s0 += vload(xr + h);
    const float mean = hsum(s0 + s1) / (float)n.H;
    vf v0{}, v1{};
    h = 0;
    for (; h + 2 * VL <= Hp; h += 2 * VL) {
      vf d0 = vload(xr + h) - mean, d1 = vload(xr + h + VL) - mean;
      v0 += d0 * d0;
      v1 += d1 * d1;
    }
    for (; h < Hp; h += VL) {
      vf d = vload(xr + h) - mean;
      v0 += d * d;
    }
    // each zero padding entry contributed mean^2
    float var = (hsum(v0 + v1) - (float)(Hp - n.H) * mean * mean) / (float)n.H;
    var = std::max(var, 0.0f);
    const float rstd = 1.0f / std::sqrt(var + n.eps);
    for (h = 0; h < Hp; h += VL) vstore(yr + h, (vload(xr + h) - mean) * rstd * vload(n.g + h) + vload(n.b + h));
  }
}

// ------------------------------------------------------------------------------------- blocks
enum Kind : int64_t { kDiag = 0, kDPLR = 1 };

// SSM parameters are stored per tile of VL channels, interleaved over the state index n so that a
// step streams one contiguous block per tile:  ssm[tile][k][plane][VL]  (k < n), and per-channel
// constants chan[tile][c][VL]. The state is state[b][tile][k][re, im][VL].
//   diag planes:  dA re/im, dB re/im, C re/im;                       chan: D
//   DPLR planes:  FE re/im, FdtB re/im, C re/im, then per rank j: G_j re/im, Qc_j re/im, QFE_j re/im;
//                 chan: M (r x r), K1 (r x r), K2 (r), D
//   DPLR aux[b][tile][2r][VL]: q_j = 2 Re sum_k Qc_j x and a_j = 2 Re sum_k QFE_j x of the current
//                 state, accumulated while the previous step wrote it (refresh() recomputes them).
// The DPLR step in one pass (FE = F E, FdtB = F dtB, G = F Pd, QFE = Qc FE,
// K1_ij = 2 Re sum_k Qc_i G_j, K2_i = 2 Re sum_k Qc_i FdtB):
//   q2 = a - K1 q + K2 u  (= 2 Re sum Qc z with z = F (E x - Pd q + dtB u));  q3 = M q2
//   x' = FE x + FdtB u - sum_j G_j (q_j + q3_j);  y = 2 Re sum C x';  q', a' from x'
enum DiagPlane { kdA = 0, kdB = 2, kdC = 4, kDiagPlanes = 6 };
enum DPLRPlane { kFE = 0, kFdtB = 2, kC = 4, kRank0 = 6, kPerRank = 6 };

struct Block {
  bool stateful = false, prenorm = true;
  Norm norm;
  int64_t H = 0, Hp = 0;
  // S4
  int64_t kind = kDiag, rank = 0, n = 0, planes = 0, chans = 0;
  const float* ssm = nullptr;   // (Hp / VL, n, planes, VL)
  const float* chan = nullptr;  // (Hp / VL, chans, VL)
  Linear out;                   // H -> 2H (GLU halves at [0, Hp) and [Hp, 2 Hp))
  float* state = nullptr;       // (B, Hp / VL, n, 2, VL)
  float* aux = nullptr;         // (B, Hp / VL, 2 rank, VL)
  // FF
  Linear ff1, ff2;
};

// s[r, :] = GELU(SSM_step(u[r, :]) + D u) for one S4D block, rows [r0, r0 + R) of the batch.
static void ssm_diag(const Block& blk, const float* __restrict u, int64_t r0, int64_t R, float* __restrict s) {
  const int64_t n = blk.n, Hp = blk.Hp, tiles = Hp / VL;
  for (int64_t t = 0; t < tiles; ++t) {
    const float* __restrict par = blk.ssm + t * n * kDiagPlanes * VL;
    const vf D = vload(blk.chan + t * blk.chans * VL);
    for (int64_t r = 0; r < R; ++r) {
      float* __restrict x = blk.state + ((r0 + r) * tiles + t) * n * 2 * VL;
      const vf uv = vload(u + r * Hp + t * VL);
      vf y0{}, y1{};
      for (int64_t k = 0; k < n; ++k) {
        const float* p = par + k * kDiagPlanes * VL;
        const vf xr = vload(x + 2 * k * VL), xi = vload(x + (2 * k + 1) * VL);
        const vf ar = vload(p + kdA * VL), ai = vload(p + (kdA + 1) * VL);
        const vf nr = ar * xr - ai * xi + vload(p + kdB * VL) * uv;
        const vf ni = ar * xi + ai * xr + vload(p + (kdB + 1) * VL) * uv;
        vstore(x + 2 * k * VL, nr);
        vstore(x + (2 * k + 1) * VL, ni);
        y0 += vload(p + kdC * VL) * nr;
        y1 += vload(p + (kdC + 1) * VL) * ni;
      }
      vstore(s + r * Hp + t * VL, vgelu(2.0f * (y0 - y1) + D * uv));
    }
  }
}

template <int RANK>
static void ssm_dplr(const Block& blk, const float* __restrict u, int64_t r0, int64_t R, float* __restrict s) {
  constexpr int MAXR = RANK > 0 ? RANK : 4;
  const int64_t n = blk.n, Hp = blk.Hp, tiles = Hp / VL, rank = RANK > 0 ? RANK : blk.rank;
  const int64_t P = blk.planes;
  for (int64_t t = 0; t < tiles; ++t) {
    const float* __restrict par = blk.ssm + t * n * P * VL;
    const float* __restrict ch = blk.chan + t * blk.chans * VL;
    const float* M = ch;
    const float* K1 = ch + rank * rank * VL;
    const float* K2 = ch + 2 * rank * rank * VL;
    const vf D = vload(ch + (2 * rank * rank + rank) * VL);
    for (int64_t r = 0; r < R; ++r) {
      float* __restrict x = blk.state + ((r0 + r) * tiles + t) * n * 2 * VL;
      float* __restrict aux = blk.aux + ((r0 + r) * tiles + t) * 2 * rank * VL;
      const vf uv = vload(u + r * Hp + t * VL);
      vf q[MAXR], q2[MAXR], c[MAXR];
      for (int64_t i = 0; i < rank; ++i) {
        q[i] = vload(aux + i * VL);
        q2[i] = vload(aux + (rank + i) * VL) + vload(K2 + i * VL) * uv;  // a + K2 u
      }
      for (int64_t i = 0; i < rank; ++i)
        for (int64_t j = 0; j < rank; ++j) q2[i] -= vload(K1 + (i * rank + j) * VL) * q[j];
      for (int64_t i = 0; i < rank; ++i) {
        vf q3{};
        for (int64_t j = 0; j < rank; ++j) q3 += vload(M + (i * rank + j) * VL) * q2[j];
        c[i] = q[i] + q3;
      }
      vf y0{}, y1{}, qn[MAXR], an[MAXR];
      for (int64_t i = 0; i < rank; ++i) qn[i] = vf{}, an[i] = vf{};
      for (int64_t k = 0; k < n; ++k) {
        const float* p = par + k * P * VL;
        const vf xr = vload(x + 2 * k * VL), xi = vload(x + (2 * k + 1) * VL);
        const vf er = vload(p + kFE * VL), ei = vload(p + (kFE + 1) * VL);
        vf nr = er * xr - ei * xi + vload(p + kFdtB * VL) * uv;
        vf ni = er * xi + ei * xr + vload(p + (kFdtB + 1) * VL) * uv;
        for (int64_t i = 0; i < rank; ++i) {
          const float* g = p + (kRank0 + kPerRank * i) * VL;
          nr -= vload(g) * c[i];
          ni -= vload(g + VL) * c[i];
        }
        vstore(x + 2 * k * VL, nr);
        vstore(x + (2 * k + 1) * VL, ni);
        y0 += vload(p + kC * VL) * nr;
        y1 += vload(p + (kC + 1) * VL) * ni;
        for (int64_t i = 0; i < rank; ++i) {
          const float* g = p + (kRank0 + kPerRank * i) * VL;
          qn[i] += vload(g + 2 * VL) * nr - vload(g + 3 * VL) * ni;
          an[i] += vload(g + 4 * VL) * nr - vload(g + 5 * VL) * ni;
        }
      }
      for (int64_t i = 0; i < rank; ++i) {
        vstore(aux + i * VL, 2.0f * qn[i]);
        vstore(aux + (rank + i) * VL, 2.0f * an[i]);
      }
      vstore(s + r * Hp + t * VL, vgelu(2.0f * (y0 - y1) + D * uv));
    }
  }
}

// aux (q, a) of the current DPLR state, for all rows (after the state was set from outside).
static void dplr_refresh(const Block& blk, int64_t B) {
  const int64_t n = blk.n, tiles = blk.Hp / VL, rank = blk.rank, P = blk.planes;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < tiles; ++t) {
      const float* par = blk.ssm + t * n * P * VL;
      const float* x = blk.state + (b * tiles + t) * n * 2 * VL;
      float* aux = blk.aux + (b * tiles + t) * 2 * rank * VL;
      for (int64_t i = 0; i < rank; ++i) {
        vf qn{}, an{};
        for (int64_t k = 0; k < n; ++k) {
          const float* g = par + (k * P + kRank0 + kPerRank * i) * VL;
          const vf xr = vload(x + 2 * k * VL), xi = vload(x + (2 * k + 1) * VL);
          qn += vload(g + 2 * VL) * xr - vload(g + 3 * VL) * xi;
          an += vload(g + 4 * VL) * xr - vload(g + 5 * VL) * xi;
        }
        vstore(aux + i * VL, 2.0f * qn);
        vstore(aux + (rank + i) * VL, 2.0f * an);
      }
    }
}

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

struct SampleScratch {
  std::vector<uint32_t> key, index, key2, index2;
  std::vector<double> cum, w;
};

// Stable LSD radix sort of (key, index) pairs by key ascending (8-bit digits; a digit shared by all
// keys is skipped). Result in key/index.
static void radix_sort(SampleScratch& sc, int64_t V) {
  uint32_t *key = sc.key.data(), *index = sc.index.data(), *key2 = sc.key2.data(), *index2 = sc.index2.data();
  for (int shift = 0; shift < 32; shift += 8) {
    int64_t count[256] = {0};
    for (int64_t i = 0; i < V; ++i) ++count[(key[i] >> shift) & 255u];
    if (count[(key[0] >> shift) & 255u] == V) continue;
    int64_t offset = 0;
    for (int d = 0; d < 256; ++d) {
      const int64_t c = count[d];
      count[d] = offset;
      offset += c;
    }
    for (int64_t i = 0; i < V; ++i) {
      const int64_t to = count[(key[i] >> shift) & 255u]++;
      key2[to] = key[i];
      index2[to] = index[i];
    }
    std::swap(key, key2);
    std::swap(index, index2);
  }
  if (key != sc.key.data()) {
    std::memcpy(sc.key.data(), key, V * sizeof(uint32_t));
    std::memcpy(sc.index.data(), index, V * sizeof(uint32_t));
  }
}

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
  void add_s4_block(int64_t group, int64_t level, bool prenorm, at::Tensor norm_w, at::Tensor norm_b, double eps,
                    int64_t kind, int64_t rank, at::Tensor ssm, at::Tensor chan, at::Tensor out_w, at::Tensor out_b,
                    at::Tensor state, at::Tensor aux) {
    Level& lv = level_at(level);
    Block blk;
    blk.stateful = true;
    blk.prenorm = prenorm;
    blk.H = lv.H, blk.Hp = lv.Hp;
    blk.norm = norm(norm_w, norm_b, eps, lv);
    TORCH_CHECK(kind == kDiag || kind == kDPLR, "sashimi_step: unknown SSM kind ", kind);
    TORCH_CHECK(kind == kDiag || (rank >= 1 && rank <= 4), "sashimi_step: DPLR rank must be in 1..4, got ", rank);
    blk.kind = kind, blk.rank = kind == kDPLR ? rank : 0;
    const int64_t tiles = lv.Hp / VL;
    blk.planes = kind == kDiag ? (int64_t)kDiagPlanes : kRank0 + kPerRank * rank;
    blk.chans = kind == kDiag ? 1 : 2 * rank * rank + rank + 1;
    check(ssm, "ssm", 4);
    TORCH_CHECK(ssm.size(0) == tiles && ssm.size(2) == blk.planes && ssm.size(3) == VL, "sashimi_step: ssm must be (",
                tiles, ", n, ", blk.planes, ", ", VL, "), got ", ssm.sizes());
    blk.n = ssm.size(1);
    blk.ssm = keep(ssm);
    check(chan, "chan", 3);
    TORCH_CHECK(chan.size(0) == tiles && chan.size(1) == blk.chans && chan.size(2) == VL, "sashimi_step: chan must be (",
                tiles, ", ", blk.chans, ", ", VL, "), got ", chan.sizes());
    blk.chan = keep(chan);
    blk.out = linear(out_w, out_b, lv.Hp, 2 * lv.Hp);
    check(state, "state", 5);
    TORCH_CHECK(state.size(0) == B_ && state.size(1) == tiles && state.size(2) == blk.n && state.size(3) == 2 &&
                state.size(4) == VL, "sashimi_step: bad state shape ", state.sizes());
    blk.state = keep(state);
    check(aux, "aux", 4);
    TORCH_CHECK(aux.size(0) == B_ && aux.size(1) == tiles && aux.size(2) == 2 * blk.rank && aux.size(3) == VL,
                "sashimi_step: bad aux shape ", aux.sizes());
    if (blk.rank > 0) blk.aux = keep(aux);
    (group == 0 ? lv.down : lv.up).push_back(blk);
  }

  // Recompute the DPLR auxiliaries from the states (call after writing the state tensors).
  void refresh() {
    for (auto& lv : levels_)
      for (auto* group : {&lv.down, &lv.up})
        for (auto& blk : *group)
          if (blk.stateful && blk.kind == kDPLR) dplr_refresh(blk, B_);
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

  void finalize() {
    TORCH_CHECK(has_center_ && head_.w != nullptr, "sashimi_step: incomplete model (centre or head missing)");
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
  bool has_center_ = false, finalized_ = false;
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

  template <class F>
  void parallel_rows(const F& f) {
    const int64_t chunks = std::min<int64_t>(B_, std::max<int64_t>(1, at::get_num_threads()));
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
      if (blk.kind == kDiag) {
        ssm_diag(blk, in, r0, R, s);
      } else {
        switch (blk.rank) {
          case 1: ssm_dplr<1>(blk, in, r0, R, s); break;
          case 2: ssm_dplr<2>(blk, in, r0, R, s); break;
          default: ssm_dplr<0>(blk, in, r0, R, s); break;
        }
      }
      gemm<false>(s, Hp, R, blk.out, big, lv.big_width);
      for (int64_t r = 0; r < R; ++r) {  // x += GLU(big) = a * sigmoid(b)
        const float* a = big + r * lv.big_width;
        for (int64_t h = 0; h < Hp; h += VL)
          vstore(x + r * Hp + h, vload(x + r * Hp + h) + vload(a + h) * vsigmoid(vload(a + Hp + h)));
      }
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
  // ---------------------------------------------------------------------------------- sampling
  // See the rule in sashimi/fast_step.py. Returns the token; *logprob = log_softmax(logits)[token].
  static int64_t sample_row(const float* logits, int64_t V, double u, double temperature, int64_t top_k,
                            double top_p, SampleScratch& sc, double* logprob) {
    int64_t imax = 0;
    for (int64_t i = 1; i < V; ++i)
      if (logits[i] > logits[imax]) imax = i;
    const double lmax = logits[imax];
    if ((int64_t)sc.w.size() < V) {
      for (auto* v : {&sc.key, &sc.index, &sc.key2, &sc.index2}) v->resize(V);
      sc.w.resize(V), sc.cum.resize(V);
    }
    double total = 0.0;  // sum_i exp(l_i - lmax), index order
    for (int64_t i = 0; i < V; ++i) {
      sc.w[i] = std::exp((double)logits[i] - lmax);
      total += sc.w[i];
    }
    int64_t chosen = imax;
    if (temperature > 0) {
      // order: logit descending, ties by lower index (a stable sort of index-ordered keys)
      for (int64_t i = 0; i < V; ++i) {
        float l = logits[i] == 0.0f ? 0.0f : logits[i];  // -0 == +0
        uint32_t bits;
        std::memcpy(&bits, &l, 4);
        const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
        sc.key[i] = ~ascending;
        sc.index[i] = (uint32_t)i;
      }
      radix_sort(sc, V);
      const int64_t K = (top_k > 0 && top_k < V) ? top_k : V;
      double c = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = sc.index[j];
        const double w = temperature == 1.0 ? sc.w[i] : std::exp(((double)logits[i] - lmax) / temperature);
        c += w;
        sc.cum[j] = c;
      }
      const double threshold = top_p * sc.cum[K - 1];
      int64_t m = K;
      for (int64_t j = 0; j < K; ++j)
        if (sc.cum[j] >= threshold) {
          m = j + 1;
          break;
        }
      const double target = u * sc.cum[m - 1];
      int64_t pick = m - 1;
      for (int64_t j = 0; j < m; ++j)
        if (sc.cum[j] > target) {
          pick = j;
          break;
        }
      chosen = sc.index[pick];
    }
    *logprob = ((double)logits[chosen] - lmax) - std::log(total);
    return chosen;
  }
};

// Sampling on given logits (B, V) (for tests of the rule): tokens (B,), logprobs (B,).
void sample(at::Tensor logits, at::Tensor uniforms, double temperature, int64_t top_k, double top_p,
            at::Tensor tokens, at::Tensor logprobs) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2,
              "sashimi_step.sample: logits must be contiguous float32 (B, V)");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1 && V < (int64_t(1) << 32), "sashimi_step.sample: bad number of classes");
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous() && uniforms.numel() == B,
              "sashimi_step.sample: uniforms must be float64 (B,)");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.numel() == B,
              "sashimi_step.sample: tokens must be int64 (B,)");
  TORCH_CHECK(logprobs.scalar_type() == at::kDouble && logprobs.is_contiguous() && logprobs.numel() == B,
              "sashimi_step.sample: logprobs must be float64 (B,)");
  TORCH_CHECK(temperature >= 0 && top_k >= 0 && top_p > 0 && top_p <= 1, "sashimi_step.sample: bad settings");
  SampleScratch sc;
  for (int64_t b = 0; b < B; ++b) {
    double lp;
    tokens.data_ptr<int64_t>()[b] = Engine::sample_row(logits.data_ptr<float>() + b * V, V,
                                                       uniforms.data_ptr<double>()[b], temperature, top_k, top_p,
                                                       sc, &lp);
    logprobs.data_ptr<double>()[b] = lp;
  }
}

}  // namespace sashimi_step

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using sashimi_step::Engine;
  m.doc() = "Fused CPU engine for the WaveformAR recurrent step (see sashimi/fast_step.py)";
  m.attr("VECTOR") = sashimi_step::VL;
  py::class_<Engine>(m, "Engine")
      .def(py::init<int64_t, int64_t, at::Tensor>())
      .def("add_level", &Engine::add_level)
      .def("set_center", &Engine::set_center)
      .def("add_s4_block", &Engine::add_s4_block)
      .def("add_ff_block", &Engine::add_ff_block)
      .def("set_head", &Engine::set_head)
      .def("finalize", &Engine::finalize)
      .def("refresh", &Engine::refresh)
      .def("phases", &Engine::phases)
      .def("set_phases", &Engine::set_phases)
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("generate", &Engine::generate, py::call_guard<py::gil_scoped_release>());
  m.def("sample", &sashimi_step::sample, py::call_guard<py::gil_scoped_release>());
}
