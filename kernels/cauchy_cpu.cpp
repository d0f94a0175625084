// Conjugate-symmetric Cauchy product on the CPU: forward and backward, fused (never builds (B, N, L)).
//
// For one pole w and one node z write e1 = z - w, e2 = z - conj(w). They share the real part
// d = Re z - Re w and have imaginary parts Im z -/+ Im w, each formed by one subtraction, so no
// cancellation is introduced. The forward pairs the two terms over one denominator
//
//     v/e1 + conj(v)/e2 = (v e2 + conj(v) e1) / (e1 e2)
//                       = (2 Re v d - 2 Im v Im w  +  i 2 Re v Im z) / D,    D = e1 e2,
//     D = d^2 - Im(e1) Im(e2) + i 2 d Im z,
//
// and divides once by the real |D|^2: one division per (n, k) instead of two complex ones. Both
// parts of D are accurate to a few ulps of |D| (Re D only cancels when |Im z| > |d|, and then
// |Im D| >= |Re D| carries the magnitude), so each pair term is accurate to a few ulps of
// |v/e1| + |v/e2|, the same as the naive sum.
//
// The backward needs p1 = 1/e1 and p2 = 1/e2 separately; both come from the one division
// 1/(|e1|^2 |e2|^2):  p1 = conj(e1) |e2|^2 / (|e1|^2 |e2|^2),  p2 = conj(e2) |e1|^2 / (...).
// With PyTorch's convention (grad = conj(df/dx) g + (df/dconj x) conj(g)):
//     grad_v[n] = sum_k g conj(p1) + conj(g) p2
//     grad_w[n] = conj(v) sum_k g conj(p1)^2 + conj(g) p2^2
//     grad_z[k] = -sum_b g conj(sum_n v p1^2 + conj(v) p2^2)
//
// The inner loops run over k (contiguous, split re/im) with per-n scalars broadcast, so they
// vectorise without reassociating any sum except the declared OpenMP SIMD reductions.
//
// Range guard: the single division squares the distances (|D|^2 = |e1|^2 |e2|^2). A row whose
// bound max|z| + max|w| could overflow that, or a tile whose smallest |D|^2 is subnormal or whose
// result is not finite, is recomputed term by term in long double (slow, exact semantics of
// complex division), so extreme inputs are slow, never wrong.
#include "s4lib_cpu.h"

#include <algorithm>
#include <cmath>
#include <complex>
#include <limits>
#include <vector>

namespace s4lib_cpu {
namespace {

using Wide = long double;
using WideComplex = std::complex<Wide>;

template <typename T>
bool row_in_range(double z_abs_max, double w_abs_max, double scale_max) {
  // |e| <= E for every pair; the fast path forms up to E^4 (|D|^2) and scale * E^3.
  const double E = z_abs_max + w_abs_max;
  const double limit = static_cast<double>(std::numeric_limits<T>::max()) / 64;
  return std::isfinite(E) && E * E * E * E < limit && scale_max * E * E * E < limit;
}

template <typename T>
constexpr T smallest_safe_denominator() {
  return std::numeric_limits<T>::min() * 16;  // |D|^2 above this: 1/|D|^2 finite, |D|^2 normal
}

template <typename T>
bool all_finite(const T* a, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(a[i]);
  return ok;
}

template <typename T>
WideComplex load_complex(const T* a, int64_t i) {
  return WideComplex(static_cast<Wide>(a[2 * i]), static_cast<Wide>(a[2 * i + 1]));
}

// Per-row scalars for the fast paths.
template <typename T>
struct RowPoles {
  std::vector<T> w_re, w_im, v_re, v_im;
  double w_abs_max = 0, v_abs_max = 0;
  RowPoles(const T* v, const T* w, int64_t N) : w_re(N), w_im(N), v_re(N), v_im(N) {
    for (int64_t n = 0; n < N; ++n) {
      w_re[n] = w[2 * n];
      w_im[n] = w[2 * n + 1];
      v_re[n] = v[2 * n];
      v_im[n] = v[2 * n + 1];
      w_abs_max = std::max(w_abs_max, std::hypot(double(w_re[n]), double(w_im[n])));
      v_abs_max = std::max(v_abs_max, std::hypot(double(v_re[n]), double(v_im[n])));
    }
  }
};

// Loads z[k0 + t] for t < kTile into split arrays; lanes past the end repeat the last node so the
// padded lanes compute something finite (their results are discarded).
template <typename T, int64_t Tile>
void load_nodes(const CauchyProblem<T>& p, int64_t k0, int64_t count, T* z_re, T* z_im) {
  for (int64_t t = 0; t < Tile; ++t) {
    const int64_t k = k0 + std::min(t, count - 1);
    z_re[t] = p.z_re[k];
    z_im[t] = p.z_im[k];
  }
}

template <typename T>
void cauchy_forward_tile_wide(const CauchyProblem<T>& p, const T* v, const T* w, int64_t k0, int64_t count,
                              T* r) {
  for (int64_t t = 0; t < count; ++t) {
    const WideComplex z(p.z_re[k0 + t], p.z_im[k0 + t]);
    WideComplex sum = 0;
    for (int64_t n = 0; n < p.N; ++n) {
      const WideComplex vn = load_complex(v, n), wn = load_complex(w, n);
      sum += vn / (z - wn) + std::conj(vn) / (z - std::conj(wn));
    }
    r[2 * t] = static_cast<T>(sum.real());
    r[2 * t + 1] = static_cast<T>(sum.imag());
  }
}

}  // namespace

template <typename T>
void cauchy_forward_slice(const CauchyProblem<T>& p, T* r, int64_t b, int64_t k0, int64_t k1) {
  constexpr int64_t Tile = kCauchyTile;
  const int64_t N = p.N;
  const T* v = p.v + 2 * b * N;
  const T* w = p.w + 2 * b * N;
  T* out = r + 2 * b * p.L;
  const RowPoles<T> row(v, w, N);
  // Per-pole coefficients of the paired numerator: Re = a d - c, Im = a Im z.
  std::vector<T> a(N), c(N);
  for (int64_t n = 0; n < N; ++n) {
    a[n] = 2 * row.v_re[n];
    c[n] = 2 * row.v_im[n] * row.w_im[n];
  }
  const bool fast_row = row_in_range<T>(p.z_abs_max, row.w_abs_max, 4 * row.v_abs_max);

  alignas(64) T z_re[Tile], z_im[Tile], acc_re[Tile], acc_im[Tile], tile_out[2 * Tile];
  for (int64_t kt = k0; kt < k1; kt += Tile) {
    const int64_t count = std::min(Tile, k1 - kt);
    bool ok = fast_row;
    if (fast_row) {
      load_nodes<T, Tile>(p, kt, count, z_re, z_im);
      for (int64_t t = 0; t < Tile; ++t) acc_re[t] = acc_im[t] = 0;
      T den_min = std::numeric_limits<T>::max();
      for (int64_t n = 0; n < N; ++n) {
        const T wr = row.w_re[n], wi = row.w_im[n], an = a[n], cn = c[n];
#pragma omp simd reduction(min : den_min)
        for (int64_t t = 0; t < Tile; ++t) {
          const T d = z_re[t] - wr;
          const T e1 = z_im[t] - wi, e2 = z_im[t] + wi;
          const T D_re = d * d - e1 * e2;
          const T D_im = 2 * d * z_im[t];
          const T num_re = an * d - cn, num_im = an * z_im[t];
          const T den = D_re * D_re + D_im * D_im;
          den_min = std::min(den_min, den);
          const T inv = T(1) / den;
          acc_re[t] += (num_re * D_re + num_im * D_im) * inv;
          acc_im[t] += (num_im * D_re - num_re * D_im) * inv;
        }
      }
      ok = den_min >= smallest_safe_denominator<T>() && all_finite(acc_re, count) && all_finite(acc_im, count);
    }
    if (ok) {
      for (int64_t t = 0; t < count; ++t) {
        tile_out[2 * t] = acc_re[t];
        tile_out[2 * t + 1] = acc_im[t];
      }
    } else {
      cauchy_forward_tile_wide(p, v, w, kt, count, tile_out);
    }
    std::copy(tile_out, tile_out + 2 * count, out + 2 * kt);
  }
}

namespace {

// Long-double backward for one tile: same outputs as the fast path.
template <typename T>
void cauchy_backward_tile_wide(const CauchyProblem<T>& p, const T* v, const T* w, const T* g, int64_t k0,
                               int64_t count, double* sums_vw, double* grad_z_re, double* grad_z_im) {
  for (int64_t t = 0; t < count; ++t) {
    const int64_t k = k0 + t;
    const WideComplex z(p.z_re[k], p.z_im[k]);
    const WideComplex gk = load_complex(g, k);
    WideComplex Tk = 0;
    for (int64_t n = 0; n < p.N; ++n) {
      const WideComplex vn = load_complex(v, n), wn = load_complex(w, n);
      const WideComplex p1 = Wide(1) / (z - wn), p2 = Wide(1) / (z - std::conj(wn));
      const WideComplex A = gk * std::conj(p1), Bq = std::conj(gk) * p2;
      if (sums_vw) {
        const WideComplex sv = A + Bq, sw = A * std::conj(p1) + Bq * p2;
        sums_vw[4 * n + 0] += double(sv.real());
        sums_vw[4 * n + 1] += double(sv.imag());
        sums_vw[4 * n + 2] += double(sw.real());
        sums_vw[4 * n + 3] += double(sw.imag());
      }
      Tk += vn * p1 * p1 + std::conj(vn) * p2 * p2;
    }
    if (grad_z_re) {
      const WideComplex gz = -gk * std::conj(Tk);
      grad_z_re[k] += double(gz.real());
      grad_z_im[k] += double(gz.imag());
    }
  }
}

template <typename T, bool NeedVW, bool NeedZ>
void cauchy_backward_impl(const CauchyProblem<T>& p, const T* g_all, int64_t b, int64_t k0, int64_t k1,
                          double* sums_vw, double* grad_z_re, double* grad_z_im) {
  constexpr int64_t Tile = 4 * kCauchyTile;
  const int64_t N = p.N;
  const T* v = p.v + 2 * b * N;
  const T* w = p.w + 2 * b * N;
  const T* g = g_all + 2 * b * p.L;
  const RowPoles<T> row(v, w, N);
  const bool fast_row = row_in_range<T>(p.z_abs_max, row.w_abs_max, 1.0);

  std::vector<double> tile_sums(NeedVW ? 4 * N : 0);
  alignas(64) T z_re[Tile], z_im[Tile], g_re[Tile], g_im[Tile], T_re[Tile], T_im[Tile];
  for (int64_t kt = k0; kt < k1; kt += Tile) {
    const int64_t count = std::min(Tile, k1 - kt);
    bool ok = fast_row;
    if (fast_row) {
      load_nodes<T, Tile>(p, kt, count, z_re, z_im);
      for (int64_t t = 0; t < Tile; ++t) {
        g_re[t] = t < count ? g[2 * (kt + t)] : T(0);  // padded lanes contribute nothing
        g_im[t] = t < count ? g[2 * (kt + t) + 1] : T(0);
        T_re[t] = T_im[t] = 0;
      }
      T den_min = std::numeric_limits<T>::max();
      bool finite = true;
      for (int64_t n = 0; n < N; ++n) {
        const T wr = row.w_re[n], wi = row.w_im[n], vr = row.v_re[n], vi = row.v_im[n];
        T sv_re = 0, sv_im = 0, sw_re = 0, sw_im = 0;
#pragma omp simd reduction(+ : sv_re, sv_im, sw_re, sw_im) reduction(min : den_min)
        for (int64_t t = 0; t < Tile; ++t) {
          const T d = z_re[t] - wr;
          const T e1 = z_im[t] - wi, e2 = z_im[t] + wi;  // Im(z - w), Im(z - conj w)
          const T d2 = d * d;
          const T m1 = d2 + e1 * e1, m2 = d2 + e2 * e2;
          const T den = m1 * m2;
          den_min = std::min(den_min, den);
          const T inv = T(1) / den;
          const T s1 = m2 * inv, s2 = m1 * inv;              // 1/|e1|^2, 1/|e2|^2
          const T c1_re = d * s1, c1_im = e1 * s1;            // conj(p1)
          const T p2_re = d * s2, p2_im = -e2 * s2;           // p2
          if (NeedVW) {
            const T gr = g_re[t], gi = g_im[t];
            const T A_re = gr * c1_re - gi * c1_im, A_im = gr * c1_im + gi * c1_re;   // g conj(p1)
            const T B_re = gr * p2_re + gi * p2_im, B_im = gr * p2_im - gi * p2_re;   // conj(g) p2
            sv_re += A_re + B_re;
            sv_im += A_im + B_im;
            sw_re += (A_re * c1_re - A_im * c1_im) + (B_re * p2_re - B_im * p2_im);
            sw_im += (A_re * c1_im + A_im * c1_re) + (B_re * p2_im + B_im * p2_re);
          }
          if (NeedZ) {
            // v p1^2 + conj(v) p2^2 with p1^2 = conj(c1^2)
            const T q1_re = c1_re * c1_re - c1_im * c1_im, q1_im = -2 * c1_re * c1_im;
            const T q2_re = p2_re * p2_re - p2_im * p2_im, q2_im = 2 * p2_re * p2_im;
            T_re[t] += (vr * q1_re - vi * q1_im) + (vr * q2_re + vi * q2_im);
            T_im[t] += (vr * q1_im + vi * q1_re) + (vr * q2_im - vi * q2_re);
          }
        }
        if (NeedVW) {
          finite &= std::isfinite(sv_re) && std::isfinite(sv_im) && std::isfinite(sw_re) && std::isfinite(sw_im);
          tile_sums[4 * n + 0] = sv_re;
          tile_sums[4 * n + 1] = sv_im;
          tile_sums[4 * n + 2] = sw_re;
          tile_sums[4 * n + 3] = sw_im;
        }
      }
      if (NeedZ) finite &= all_finite(T_re, count) && all_finite(T_im, count);
      ok = finite && den_min >= smallest_safe_denominator<T>();
    }
    if (!ok) {
      cauchy_backward_tile_wide(p, v, w, g, kt, count, NeedVW ? sums_vw : nullptr,
                                NeedZ ? grad_z_re : nullptr, NeedZ ? grad_z_im : nullptr);
      continue;
    }
    if (NeedVW)
      for (int64_t i = 0; i < 4 * N; ++i) sums_vw[i] += tile_sums[i];
    if (NeedZ)
      for (int64_t t = 0; t < count; ++t) {  // -g conj(T)
        const double gr = g_re[t], gi = g_im[t], tr = T_re[t], ti = T_im[t];
        grad_z_re[kt + t] -= gr * tr + gi * ti;
        grad_z_im[kt + t] -= gi * tr - gr * ti;
      }
  }
}

}  // namespace

template <typename T>
void cauchy_backward_slice(const CauchyProblem<T>& p, const T* g, int64_t b, int64_t k0, int64_t k1,
                           double* sums_vw, double* grad_z_re, double* grad_z_im) {
  if (sums_vw && grad_z_re)
    cauchy_backward_impl<T, true, true>(p, g, b, k0, k1, sums_vw, grad_z_re, grad_z_im);
  else if (sums_vw)
    cauchy_backward_impl<T, true, false>(p, g, b, k0, k1, sums_vw, nullptr, nullptr);
  else if (grad_z_re)
    cauchy_backward_impl<T, false, true>(p, g, b, k0, k1, nullptr, grad_z_re, grad_z_im);
}

template void cauchy_forward_slice<float>(const CauchyProblem<float>&, float*, int64_t, int64_t, int64_t);
template void cauchy_forward_slice<double>(const CauchyProblem<double>&, double*, int64_t, int64_t, int64_t);
template void cauchy_backward_slice<float>(const CauchyProblem<float>&, const float*, int64_t, int64_t, int64_t,
                                           double*, double*, double*);
template void cauchy_backward_slice<double>(const CauchyProblem<double>&, const double*, int64_t, int64_t,
                                            int64_t, double*, double*, double*);

}  // namespace s4lib_cpu
