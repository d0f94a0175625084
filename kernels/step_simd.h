// Vector primitives shared by the fused CPU step kernels: float32 vectors, exp/erf/GELU, panel GEMM, LayerNorm.
//
// Used by kernels/s4_layer_step.h (the S4 / S4D layer step) and through it by the library's layer
// step (s4_step_cpu.cpp) and the WaveformAR engine (sashimi_step_cpu.cpp). Header-only: each
// extension compiles its own copy with -march=native.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace s4step {

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
// The first m < VL lanes of p (the rest zero), and the store of the first m lanes.
static inline vf vload_part(const float* p, int64_t m) {
  vf v{};
  std::memcpy(&v, p, m * sizeof(float));
  return v;
}
static inline void vstore_part(float* p, vf v, int64_t m) { std::memcpy(p, &v, m * sizeof(float)); }

// Complex numbers interleaved (re, im, re, im, ...) in a vector of VL / 2 of them: a * x.
static inline vf cmul(vf a, vf x) {
  const vi even = {0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14};
  const vi odd = {1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15};
  const vi swap = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  const vf sign = {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};
  const vf ar = __builtin_shuffle(a, even), ai = __builtin_shuffle(a, odd);
  return ar * x + ai * sign * __builtin_shuffle(x, swap);
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
    TORCH_CHECK(data != nullptr, "s4step: out of memory allocating ", bytes, " bytes of scratch");
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
  const uint16_t* wh = nullptr;  // the same layout in IEEE float16, used instead of w when set (fp32 sums)
  const float* b = nullptr;  // (out,)
  int64_t in = 0, out = 0;   // padded widths
};

// 16 float16 weights widened to float32 (exactly).
static inline vf vload_half(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  vf v;
  for (int i = 0; i < VL; ++i) {
    const uint32_t h = p[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    float f;
    if (e == 0) f = std::ldexp((float)m, -24);                            // zero, subnormal
    else if (e == 31) f = m ? NAN : INFINITY;                             // inf, nan
    else f = std::ldexp((float)(m | 1024u), (int)e - 25);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
    std::memcpy(&f, &bits, 4);
    v[i] = f;
  }
  return v;
#endif
}

// y[r, j0*VL : (j0+P)*VL] (+)= x[r, :in] W^T + b for R rows: R x P accumulators stay in registers.
// BIAS = false: the partial sum over the inputs [k0, k1) only, without the bias (x indexed from 0).
template <int R, int P, bool ACC, bool HALF = false, bool BIAS = true>
static inline void gemm_tile(const float* __restrict x, int64_t ldx, const Linear& L, int64_t j0,
                             float* __restrict y, int64_t ldy, int64_t k0 = 0, int64_t k1 = -1) {
  vf acc[R][P];
  for (int p = 0; p < P; ++p) {
    vf bias = BIAS ? vload(L.b + (j0 + p) * VL) : vf{};
    for (int r = 0; r < R; ++r) acc[r][p] = ACC ? vload(y + r * ldy + (j0 + p) * VL) + bias : bias;
  }
  const int64_t K = L.in, stride = K * VL, kend = k1 < 0 ? K : k1;
  const float* __restrict w = HALF ? nullptr : L.w + j0 * stride;
  const uint16_t* __restrict wh = HALF ? L.wh + j0 * stride : nullptr;
  for (int64_t k = k0; k < kend; ++k) {
    vf wv[P];
    for (int p = 0; p < P; ++p) wv[p] = HALF ? vload_half(wh + p * stride + k * VL) : vload(w + p * stride + k * VL);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * ldx + k];
      for (int p = 0; p < P; ++p) acc[r][p] += xr * wv[p];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) vstore(y + r * ldy + (j0 + p) * VL, acc[r][p]);
}

template <int R, bool ACC, bool HALF>
static void gemm_rows_t(const float* x, int64_t ldx, const Linear& L, float* y, int64_t ldy, int64_t j0,
                        int64_t panels) {
  constexpr int P = R == 1 ? 8 : (R <= 4 ? 4 : 2);
  int64_t j = j0;
  for (; j + P <= panels; j += P) gemm_tile<R, P, ACC, HALF>(x, ldx, L, j, y, ldy);
  if constexpr (P > 4) {
    for (; j + 4 <= panels; j += 4) gemm_tile<R, 4, ACC, HALF>(x, ldx, L, j, y, ldy);
  }
  if constexpr (P > 2) {
    for (; j + 2 <= panels; j += 2) gemm_tile<R, 2, ACC, HALF>(x, ldx, L, j, y, ldy);
  }
  for (; j < panels; ++j) gemm_tile<R, 1, ACC, HALF>(x, ldx, L, j, y, ldy);
}

template <int R, bool ACC>
static void gemm_rows(const float* x, int64_t ldx, const Linear& L, float* y, int64_t ldy, int64_t j0,
                      int64_t panels) {
  if (L.wh != nullptr) gemm_rows_t<R, ACC, true>(x, ldx, L, y, ldy, j0, panels);
  else gemm_rows_t<R, ACC, false>(x, ldx, L, y, ldy, j0, panels);
}

// y (rows, out) = x (rows, in) W^T + b, or y += ... (ACC), for the output panels [p0, p1) (p1 < 0: all).
// Row strides ldx, ldy. Each output is the same sequence of operations whatever the panel range
// (bias, then k = 0, 1, ... in order), so splitting the panels between threads changes no result.
template <bool ACC>
static void gemm(const float* x, int64_t ldx, int64_t rows, const Linear& L, float* y, int64_t ldy,
                 int64_t p0 = 0, int64_t p1 = -1) {
  if (p1 < 0) p1 = L.out / VL;
  if (p1 <= p0) return;
  for (int64_t r = 0; r < rows; r += 8) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    switch (std::min<int64_t>(rows - r, 8)) {
      case 1: gemm_rows<1, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      case 2: gemm_rows<2, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      case 3: gemm_rows<3, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      case 4: gemm_rows<4, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      case 5: gemm_rows<5, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      case 6: gemm_rows<6, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      case 7: gemm_rows<7, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
      default: gemm_rows<8, ACC>(xr, ldx, L, yr, ldy, p0, p1); break;
    }
  }
}

// y (rows, out) = sum over the inputs k0 <= k < k1 of x[:, k] W[:, k]^T (no bias): one part of a GEMM
// split over its inputs (the caller adds the parts and the bias in a fixed order).
template <int R, bool HALF>
static void gemm_part_rows(const float* x, int64_t ldx, const Linear& L, float* y, int64_t ldy, int64_t k0,
                           int64_t k1) {
  constexpr int P = R == 1 ? 8 : (R <= 4 ? 4 : 2);
  const int64_t panels = L.out / VL;
  int64_t j = 0;
  for (; j + P <= panels; j += P) gemm_tile<R, P, false, HALF, false>(x, ldx, L, j, y, ldy, k0, k1);
  if constexpr (P > 4) {
    for (; j + 4 <= panels; j += 4) gemm_tile<R, 4, false, HALF, false>(x, ldx, L, j, y, ldy, k0, k1);
  }
  if constexpr (P > 2) {
    for (; j + 2 <= panels; j += 2) gemm_tile<R, 2, false, HALF, false>(x, ldx, L, j, y, ldy, k0, k1);
  }
  for (; j < panels; ++j) gemm_tile<R, 1, false, HALF, false>(x, ldx, L, j, y, ldy, k0, k1);
}

static void gemm_part(const float* x, int64_t ldx, int64_t rows, const Linear& L, float* y, int64_t ldy, int64_t k0,
                      int64_t k1) {
  for (int64_t r = 0; r < rows; r += 8) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    const bool h = L.wh != nullptr;
    switch (std::min<int64_t>(rows - r, 8)) {
#define S4STEP_PART(N) case N: h ? gemm_part_rows<N, true>(xr, ldx, L, yr, ldy, k0, k1) \
                               : gemm_part_rows<N, false>(xr, ldx, L, yr, ldy, k0, k1); break;
      S4STEP_PART(1) S4STEP_PART(2) S4STEP_PART(3) S4STEP_PART(4) S4STEP_PART(5) S4STEP_PART(6) S4STEP_PART(7)
      default: h ? gemm_part_rows<8, true>(xr, ldx, L, yr, ldy, k0, k1) : gemm_part_rows<8, false>(xr, ldx, L, yr, ldy, k0, k1);
#undef S4STEP_PART
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

}  // namespace s4step
