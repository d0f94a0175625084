// CPU kernels for the S4 kernel ops: declarations shared by the kernel sources and the torch bindings.
//
// Plain C++ (no torch headers) so the arithmetic files compile fast and read on their own.
// Complex arrays are interleaved (re, im) exactly as torch stores complex64/complex128, except
// where a name ends in _re/_im (split storage). Every function processes a caller-chosen slice of
// the work (a row b and a range of the long axis) on the calling thread; the bindings spread the
// slices over threads with ATen's OpenMP pool, so torch.set_num_threads() governs them.
//
// Math (see s4lib/ops/reference.py for the oracles):
//   cauchy:              r[b,k] = sum_n v[b,n]/(z[k]-w[b,n]) + conj(v[b,n])/(z[k]-conj(w[b,n]))
//   log_vandermonde:     K[b,l] = 2 Re sum_n v[b,n] exp(x[b,n] l)
//   vandermonde moments: P0[b,n] = sum_l u[b,l] exp(x[b,n] l),  P1[b,n] = sum_l l u[b,l] exp(x[b,n] l)
#pragma once

#include <cstdint>

namespace s4lib_cpu {

// Inputs of one Cauchy call. v, w: (B, N) interleaved; z_re, z_im: (L,) split.
template <typename T>
struct CauchyProblem {
  const T* v;
  const T* w;
  const T* z_re;
  const T* z_im;
  int64_t B, N, L;
  double z_abs_max;  // max |z|, for the overflow guard
};

// rows[0..count) (count <= kMaxSharedRows) are rows of v whose poles w are identical; the
// denominators are computed once for all of them.
// Forward: r[row, k0:k1] for each row (interleaved complex, row stride L).
template <typename T>
void cauchy_forward_slice(const CauchyProblem<T>& p, T* r, const int64_t* rows, int64_t count, int64_t k0,
                          int64_t k1);

// Backward over k in [k0, k1) for upstream gradient g (B, L) interleaved, for the same row groups.
//   sums_vw (may be null): += count x N x 4 doubles  (SV_re, SV_im, SW_re, SW_im) per (row, n), where
//       SV[n] = sum_k g conj(p1) + conj(g) p2,   SW[n] = sum_k g conj(p1)^2 + conj(g) p2^2,
//       p1 = 1/(z_k - w_n), p2 = 1/(z_k - conj(w_n));  grad_v = SV,  grad_w = conj(v) SW.
//   grad_z_re/_im (may be null): += -g conj(sum_n v p1^2 + conj(v) p2^2) at absolute index k.
template <typename T>
void cauchy_backward_slice(const CauchyProblem<T>& p, const T* g, const int64_t* rows, int64_t count, int64_t k0,
                           int64_t k1, double* sums_vw, double* grad_z_re, double* grad_z_im);

// K[b, l0:l1] for v, x (B, N) interleaved; K real (B, L). l0 must be a multiple of kVandermondeTile.
template <typename T>
void log_vandermonde_slice(const T* v, const T* x, int64_t N, int64_t L, T* K, int64_t b, int64_t l0, int64_t l1);

// Partial moments over l in [l0, l1) for row b: moments[4n + 0..1] += P0[n] (re, im),
// moments[4n + 2..3] += P1[n] (only if first_moment). u real (B, L); x (B, N) interleaved.
template <typename T>
void vandermonde_moments_slice(const T* u, const T* x, int64_t N, int64_t L, bool first_moment,
                               double* moments, int64_t b, int64_t l0, int64_t l1);

constexpr int64_t kCauchyTile = 64;        // outputs z_k handled together (SIMD lanes x unroll)
constexpr int64_t kMaxSharedRows = 4;      // rows sharing poles handled by one call
constexpr int64_t kVandermondeTile = 64;   // l positions per block of the log-Vandermonde product
constexpr int64_t kReseedBlocks = 16;      // blocks between exact exp() seeds of the recurrence

}  // namespace s4lib_cpu
