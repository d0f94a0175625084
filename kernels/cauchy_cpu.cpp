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
// Rows sharing poles: in S4 the numerators of the (1 + rank) x (1 + rank) Woodbury terms all meet
// the same poles dt*Lambda, so the bindings group rows whose w are identical and hand up to
// kMaxSharedRows of them to one call; the denominators (and their division) are computed once per
// (n, k) and reused by every row of the group.
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
bool in_range(double z_abs_max, double w_abs_max, double scale_max) {
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

// A group of rows sharing one row of poles: the poles (split) and each row's numerators (split).
template <typename T>
struct Group {
  int64_t N, R;
  const T* w;                      // interleaved poles (for the exact path)
  std::vector<const T*> v;         // interleaved numerators per row
  std::vector<T> w_re, w_im;       // N
  std::vector<T> v_re, v_im;       // R x N
  double w_abs_max = 0, v_abs_max = 0;
  Group(const CauchyProblem<T>& p, const int64_t* rows, int64_t count)
      : N(p.N), R(count), w(p.w + 2 * rows[0] * p.N), v(count), w_re(N), w_im(N), v_re(count * N),
        v_im(count * N) {
    for (int64_t n = 0; n < N; ++n) {
      w_re[n] = w[2 * n];
      w_im[n] = w[2 * n + 1];
      w_abs_max = std::max(w_abs_max, std::hypot(double(w_re[n]), double(w_im[n])));
    }
    for (int64_t j = 0; j < R; ++j) {
      v[j] = p.v + 2 * rows[j] * N;
      for (int64_t n = 0; n < N; ++n) {
        v_re[j * N + n] = v[j][2 * n];
        v_im[j * N + n] = v[j][2 * n + 1];
        v_abs_max = std::max(v_abs_max, std::hypot(double(v_re[j * N + n]), double(v_im[j * N + n])));
      }
    }
  }
};

// Loads z[k0 + t] for t < Tile into split arrays; lanes past the end repeat the last node so the
// padded lanes compute something finite (their results are discarded).
template <typename T, int64_t Tile>
void load_nodes(const CauchyProblem<T>& p, int64_t k0, int64_t count, T* z_re, T* z_im) {
  for (int64_t t = 0; t < Tile; ++t) {
    const int64_t k = k0 + std::min(t, count - 1);
    z_re[t] = p.z_re[k];
    z_im[t] = p.z_im[k];
  }
}

// Exact (long double) forward of one row over one tile, written interleaved to r.
template <typename T>
void forward_tile_wide(const CauchyProblem<T>& p, const T* v, const T* w, int64_t k0, int64_t count, T* r) {
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

template <typename T, int R>
void forward_group(const CauchyProblem<T>& p, const Group<T>& grp, T* r, const int64_t* rows, int64_t k0,
                   int64_t k1) {
  constexpr int64_t Tile = kCauchyTile;
  const int64_t N = p.N;
  // Per-pole coefficients of the paired numerator: Re = a d - c, Im = a Im z.
  std::vector<T> a(R * N), c(R * N);
  for (int64_t j = 0; j < R; ++j)
    for (int64_t n = 0; n < N; ++n) {
      a[j * N + n] = 2 * grp.v_re[j * N + n];
      c[j * N + n] = 2 * grp.v_im[j * N + n] * grp.w_im[n];
    }
  const bool fast = in_range<T>(p.z_abs_max, grp.w_abs_max, 4 * grp.v_abs_max);

  alignas(64) T z_re[Tile], z_im[Tile], acc_re[R][Tile], acc_im[R][Tile], tile_out[2 * Tile];
  for (int64_t kt = k0; kt < k1; kt += Tile) {
    const int64_t count = std::min(Tile, k1 - kt);
    bool ok = fast;
    if (fast) {
      load_nodes<T, Tile>(p, kt, count, z_re, z_im);
      for (int j = 0; j < R; ++j)
        for (int64_t t = 0; t < Tile; ++t) acc_re[j][t] = acc_im[j][t] = 0;
      T den_min = std::numeric_limits<T>::max();
      for (int64_t n = 0; n < N; ++n) {
        const T wr = grp.w_re[n], wi = grp.w_im[n];
        T an[R], cn[R];
        for (int j = 0; j < R; ++j) {
          an[j] = a[j * N + n];
          cn[j] = c[j * N + n];
        }
#pragma omp simd reduction(min : den_min)
        for (int64_t t = 0; t < Tile; ++t) {
          const T d = z_re[t] - wr;
          const T e1 = z_im[t] - wi, e2 = z_im[t] + wi;  // Im(z - w), Im(z - conj w)
          const T D_re = d * d - e1 * e2;
          const T D_im = 2 * d * z_im[t];
          const T den = D_re * D_re + D_im * D_im;
          den_min = std::min(den_min, den);
          const T inv = T(1) / den;
          const T Dr = D_re * inv, Di = D_im * inv;  // conj(D) / |D|^2 = 1 / D, shared by the rows
          for (int j = 0; j < R; ++j) {
            const T num_re = an[j] * d - cn[j], num_im = an[j] * z_im[t];
            acc_re[j][t] += num_re * Dr + num_im * Di;
            acc_im[j][t] += num_im * Dr - num_re * Di;
          }
        }
      }
      ok = den_min >= smallest_safe_denominator<T>();
      for (int j = 0; j < R; ++j) ok &= all_finite(acc_re[j], count) && all_finite(acc_im[j], count);
    }
    for (int j = 0; j < R; ++j) {
      if (ok) {
        for (int64_t t = 0; t < count; ++t) {
          tile_out[2 * t] = acc_re[j][t];
          tile_out[2 * t + 1] = acc_im[j][t];
        }
      } else {
        forward_tile_wide(p, grp.v[j], grp.w, kt, count, tile_out);
      }
      std::copy(tile_out, tile_out + 2 * count, r + 2 * (rows[j] * p.L + kt));
    }
  }
}

// Exact (long double) backward of one row over one tile: same outputs as the fast paths.
template <typename T>
void backward_tile_wide(const CauchyProblem<T>& p, const T* v, const T* w, const T* g, int64_t k0, int64_t count,
                        double* sums_vw, double* grad_z_re, double* grad_z_im) {
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

// Backward of a group over k in [k0, k1). Per (n, tile): pass 1 forms the shared reciprocals
// conj(p1), p2 (and p1^2, p2^2 for grad_z) into tile arrays; pass 2 runs once per row, reducing
// over the tile into that row's sums (scalar SIMD reductions) and accumulating its grad_z terms.
template <typename T, bool NeedVW, bool NeedZ>
void backward_group(const CauchyProblem<T>& p, const Group<T>& grp, const T* g_all, const int64_t* rows,
                    int64_t k0, int64_t k1, double* sums_vw, double* grad_z_re, double* grad_z_im) {
  constexpr int64_t Tile = 4 * kCauchyTile;
  constexpr int64_t MaxR = kMaxSharedRows;
  const int64_t N = p.N, R = grp.R, L = p.L;
  const bool fast = in_range<T>(p.z_abs_max, grp.w_abs_max, 1.0);

  std::vector<double> tile_sums(NeedVW ? R * 4 * N : 0);
  alignas(64) T z_re[Tile], z_im[Tile], c1_re[Tile], c1_im[Tile], p2_re[Tile], p2_im[Tile];
  alignas(64) T q1_re[NeedZ ? Tile : 1], q1_im[NeedZ ? Tile : 1], q2_re[NeedZ ? Tile : 1], q2_im[NeedZ ? Tile : 1];
  alignas(64) T g_re[MaxR][Tile], g_im[MaxR][Tile], T_re[MaxR][NeedZ ? Tile : 1], T_im[MaxR][NeedZ ? Tile : 1];
  for (int64_t kt = k0; kt < k1; kt += Tile) {
    const int64_t count = std::min(Tile, k1 - kt);
    bool ok = fast;
    if (fast) {
      load_nodes<T, Tile>(p, kt, count, z_re, z_im);
      for (int64_t j = 0; j < R; ++j) {
        const T* g = g_all + 2 * rows[j] * L;
        for (int64_t t = 0; t < Tile; ++t) {
          g_re[j][t] = t < count ? g[2 * (kt + t)] : T(0);  // padded lanes contribute nothing
          g_im[j][t] = t < count ? g[2 * (kt + t) + 1] : T(0);
          if (NeedZ) T_re[j][t] = T_im[j][t] = 0;
        }
      }
      T den_min = std::numeric_limits<T>::max();
      bool finite = true;
      for (int64_t n = 0; n < N; ++n) {
        const T wr = grp.w_re[n], wi = grp.w_im[n];
#pragma omp simd reduction(min : den_min)
        for (int64_t t = 0; t < Tile; ++t) {
          const T d = z_re[t] - wr;
          const T e1 = z_im[t] - wi, e2 = z_im[t] + wi;  // Im(z - w), Im(z - conj w)
          const T d2 = d * d;
          const T m1 = d2 + e1 * e1, m2 = d2 + e2 * e2;
          const T den = m1 * m2;
          den_min = std::min(den_min, den);
          const T inv = T(1) / den;
          const T s1 = m2 * inv, s2 = m1 * inv;  // 1/|e1|^2, 1/|e2|^2
          c1_re[t] = d * s1;                     // conj(p1)
          c1_im[t] = e1 * s1;
          p2_re[t] = d * s2;                     // p2
          p2_im[t] = -e2 * s2;
          if (NeedZ) {                           // p1^2 = conj(c1^2), p2^2
            q1_re[t] = c1_re[t] * c1_re[t] - c1_im[t] * c1_im[t];
            q1_im[t] = -2 * c1_re[t] * c1_im[t];
            q2_re[t] = p2_re[t] * p2_re[t] - p2_im[t] * p2_im[t];
            q2_im[t] = 2 * p2_re[t] * p2_im[t];
          }
        }
        for (int64_t j = 0; j < R; ++j) {
          const T* gr_j = g_re[j];
          const T* gi_j = g_im[j];
          if (NeedVW) {
            T sv_re = 0, sv_im = 0, sw_re = 0, sw_im = 0;
#pragma omp simd reduction(+ : sv_re, sv_im, sw_re, sw_im)
            for (int64_t t = 0; t < Tile; ++t) {
              const T gr = gr_j[t], gi = gi_j[t];
              const T A_re = gr * c1_re[t] - gi * c1_im[t], A_im = gr * c1_im[t] + gi * c1_re[t];  // g conj(p1)
              const T B_re = gr * p2_re[t] + gi * p2_im[t], B_im = gr * p2_im[t] - gi * p2_re[t];  // conj(g) p2
              sv_re += A_re + B_re;
              sv_im += A_im + B_im;
              sw_re += (A_re * c1_re[t] - A_im * c1_im[t]) + (B_re * p2_re[t] - B_im * p2_im[t]);
              sw_im += (A_re * c1_im[t] + A_im * c1_re[t]) + (B_re * p2_im[t] + B_im * p2_re[t]);
            }
            finite &= std::isfinite(sv_re) && std::isfinite(sv_im) && std::isfinite(sw_re) && std::isfinite(sw_im);
            double* q = tile_sums.data() + (j * N + n) * 4;
            q[0] = sv_re;
            q[1] = sv_im;
            q[2] = sw_re;
            q[3] = sw_im;
          }
          if (NeedZ) {  // v p1^2 + conj(v) p2^2
            const T vr = grp.v_re[j * N + n], vi = grp.v_im[j * N + n];
            T* tr = T_re[j];
            T* ti = T_im[j];
#pragma omp simd
            for (int64_t t = 0; t < Tile; ++t) {
              tr[t] += (vr * q1_re[t] - vi * q1_im[t]) + (vr * q2_re[t] + vi * q2_im[t]);
              ti[t] += (vr * q1_im[t] + vi * q1_re[t]) + (vr * q2_im[t] - vi * q2_re[t]);
            }
          }
        }
      }
      if (NeedZ)
        for (int64_t j = 0; j < R; ++j) finite &= all_finite(T_re[j], count) && all_finite(T_im[j], count);
      ok = finite && den_min >= smallest_safe_denominator<T>();
    }
    for (int64_t j = 0; j < R; ++j) {
      double* row_sums = NeedVW ? sums_vw + j * 4 * N : nullptr;
      if (!ok) {
        backward_tile_wide(p, grp.v[j], grp.w, g_all + 2 * rows[j] * L, kt, count, row_sums,
                           NeedZ ? grad_z_re : nullptr, NeedZ ? grad_z_im : nullptr);
        continue;
      }
      if (NeedVW)
        for (int64_t i = 0; i < 4 * N; ++i) row_sums[i] += tile_sums[j * 4 * N + i];
      if (NeedZ)
        for (int64_t t = 0; t < count; ++t) {  // -g conj(T)
          const double gr = g_re[j][t], gi = g_im[j][t], tr = T_re[j][t], ti = T_im[j][t];
          grad_z_re[kt + t] -= gr * tr + gi * ti;
          grad_z_im[kt + t] -= gi * tr - gr * ti;
        }
    }
  }
}

}  // namespace

template <typename T>
void cauchy_forward_slice(const CauchyProblem<T>& p, T* r, const int64_t* rows, int64_t count, int64_t k0,
                          int64_t k1) {
  const Group<T> grp(p, rows, count);
  switch (count) {
    case 1: return forward_group<T, 1>(p, grp, r, rows, k0, k1);
    case 2: return forward_group<T, 2>(p, grp, r, rows, k0, k1);
    case 3: return forward_group<T, 3>(p, grp, r, rows, k0, k1);
    default: return forward_group<T, 4>(p, grp, r, rows, k0, k1);
  }
}

template <typename T>
void cauchy_backward_slice(const CauchyProblem<T>& p, const T* g, const int64_t* rows, int64_t count, int64_t k0,
                           int64_t k1, double* sums_vw, double* grad_z_re, double* grad_z_im) {
  const Group<T> grp(p, rows, count);
  if (sums_vw && grad_z_re)
    backward_group<T, true, true>(p, grp, g, rows, k0, k1, sums_vw, grad_z_re, grad_z_im);
  else if (sums_vw)
    backward_group<T, true, false>(p, grp, g, rows, k0, k1, sums_vw, nullptr, nullptr);
  else if (grad_z_re)
    backward_group<T, false, true>(p, grp, g, rows, k0, k1, nullptr, grad_z_re, grad_z_im);
}

template void cauchy_forward_slice<float>(const CauchyProblem<float>&, float*, const int64_t*, int64_t, int64_t,
                                          int64_t);
template void cauchy_forward_slice<double>(const CauchyProblem<double>&, double*, const int64_t*, int64_t, int64_t,
                                           int64_t);
template void cauchy_backward_slice<float>(const CauchyProblem<float>&, const float*, const int64_t*, int64_t,
                                           int64_t, int64_t, double*, double*, double*);
template void cauchy_backward_slice<double>(const CauchyProblem<double>&, const double*, const int64_t*, int64_t,
                                            int64_t, int64_t, double*, double*, double*);

}  // namespace s4lib_cpu
