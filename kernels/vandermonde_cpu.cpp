// Log-Vandermonde products on the CPU (S4D kernel, its backward, and the transposed product).
//
// Every l is written l = l0 + t with l0 a multiple of the block size kVandermondeTile (64) and
// 0 <= t < 64, so exp(x l) = exp(x l0) exp(x t):
//   * a table E[n][t] = exp(x_n t) (N x 64) is built once per slice,
//   * a per-block seed s_n = exp(x_n l0) advances by one complex multiply s_n *= exp(64 x_n).
// Table and seeds are formed in double and re-seeded with an exact exp() every few steps
// (float: the table from t = 0 and the seeds every 1024 blocks, whose recurrence error ~1e-13 is
// far below float round-off; double: every 16 steps, keeping the error within ~20 ulps). The
// transcendental work is then O(N) per slice and the inner loops are plain multiply-adds:
//   forward:  K[l0 + t] = sum_n Re(a_n E[n][t]) with a_n = 2 v_n s_n   (2 FMAs per (n, l))
//   moments:  G_n[t] += s_n u[l0 + t],  H_n[t] += s_n (l0 + t) u[l0 + t]  accumulated over blocks,
//             P0_n = sum_t E[n][t] G_n[t],  P1_n = sum_t E[n][t] H_n[t]   (4 FMAs per (n, l)).
// Compared with evaluating exp(x l) in the working precision, this is more accurate: the phase
// x l is formed in double (exactly, for float inputs). The recurrences are written out on split
// re/im arrays: std::complex's operator* would go through __muldc3 (NaN/inf recovery), ~10x slower.
#include "s4lib_cpu.h"

#include <algorithm>
#include <complex>
#include <vector>

namespace s4lib_cpu {
namespace {

using Complex = std::complex<double>;

template <typename T> struct Reseed;
template <> struct Reseed<float> {
  static constexpr int64_t table = kVandermondeTile;  // exact exp at t = 0 only
  static constexpr int64_t blocks = 1024;
};
template <> struct Reseed<double> {
  static constexpr int64_t table = 16;
  static constexpr int64_t blocks = kReseedBlocks;
};

// E[n][t] = exp(x_n t) for t < Tile, split re/im, row-major (N, Tile); the recurrence runs over t
// with all n at once (vectorised), re-seeded exactly every Reseed<T>::table steps.
template <typename T>
void build_table(const T* x, int64_t N, std::vector<T>& E_re, std::vector<T>& E_im) {
  constexpr int64_t Tile = kVandermondeTile;
  E_re.resize(N * Tile);
  E_im.resize(N * Tile);
  std::vector<double> x_re(N), x_im(N), step_re(N), step_im(N), cur_re(N), cur_im(N);
  for (int64_t n = 0; n < N; ++n) {
    x_re[n] = x[2 * n];
    x_im[n] = x[2 * n + 1];
    const Complex step = std::exp(Complex(x_re[n], x_im[n]));
    step_re[n] = step.real();
    step_im[n] = step.imag();
  }
  for (int64_t t = 0; t < Tile; ++t) {
    if (t % Reseed<T>::table == 0) {
      for (int64_t n = 0; n < N; ++n) {
        const Complex c = t == 0 ? Complex(1) : std::exp(Complex(x_re[n] * t, x_im[n] * t));
        cur_re[n] = c.real();
        cur_im[n] = c.imag();
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      E_re[n * Tile + t] = T(cur_re[n]);
      E_im[n * Tile + t] = T(cur_im[n]);
    }
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      const double r = cur_re[n] * step_re[n] - cur_im[n] * step_im[n];
      cur_im[n] = cur_re[n] * step_im[n] + cur_im[n] * step_re[n];
      cur_re[n] = r;
    }
  }
}

// The seeds s_n = exp(x_n l0) of consecutive blocks, split re/im so the update vectorises over n.
struct Seeds {
  int64_t N, reseed_every;
  std::vector<double> x_re, x_im, re, im, step_re, step_im;
  template <typename T>
  Seeds(const T* x, int64_t n_poles, int64_t reseed)
      : N(n_poles), reseed_every(reseed), x_re(N), x_im(N), re(N), im(N), step_re(N), step_im(N) {
    for (int64_t n = 0; n < N; ++n) {
      x_re[n] = x[2 * n];
      x_im[n] = x[2 * n + 1];
      const Complex step = std::exp(Complex(x_re[n] * kVandermondeTile, x_im[n] * kVandermondeTile));
      step_re[n] = step.real();
      step_im[n] = step.imag();
    }
  }
  // Call once per block, in order, with the block's start l0 and its index since the slice start.
  void at(int64_t l0, int64_t block) {
    if (block % reseed_every == 0) {
      for (int64_t n = 0; n < N; ++n) {
        const Complex s = std::exp(Complex(x_re[n] * double(l0), x_im[n] * double(l0)));
        re[n] = s.real();
        im[n] = s.imag();
      }
      return;
    }
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      const double r = re[n] * step_re[n] - im[n] * step_im[n];
      im[n] = re[n] * step_im[n] + im[n] * step_re[n];
      re[n] = r;
    }
  }
};

}  // namespace

template <typename T>
void log_vandermonde_slice(const T* v, const T* x, int64_t N, int64_t L, T* K, int64_t b, int64_t l0,
                           int64_t l1) {
  constexpr int64_t Tile = kVandermondeTile;
  const T* vb = v + 2 * b * N;
  const T* xb = x + 2 * b * N;
  T* out = K + b * L;
  std::vector<T> E_re, E_im;
  build_table(xb, N, E_re, E_im);
  std::vector<double> v_re(N), v_im(N);  // 2 v, so that a = 2 v s
  for (int64_t n = 0; n < N; ++n) {
    v_re[n] = 2.0 * vb[2 * n];
    v_im[n] = 2.0 * vb[2 * n + 1];
  }
  Seeds seeds(xb, N, Reseed<T>::blocks);
  std::vector<T> a_re(N), a_im(N);
  alignas(64) T acc[Tile];
  int64_t block = 0;
  for (int64_t lb = l0; lb < l1; lb += Tile, ++block) {
    seeds.at(lb, block);
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      a_re[n] = T(v_re[n] * seeds.re[n] - v_im[n] * seeds.im[n]);
      a_im[n] = T(v_re[n] * seeds.im[n] + v_im[n] * seeds.re[n]);
    }
    for (int64_t t = 0; t < Tile; ++t) acc[t] = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T ar = a_re[n], ai = a_im[n];
      const T* er = E_re.data() + n * Tile;
      const T* ei = E_im.data() + n * Tile;
#pragma omp simd aligned(acc : 64)
      for (int64_t t = 0; t < Tile; ++t) acc[t] += ar * er[t] - ai * ei[t];
    }
    const int64_t count = std::min(Tile, l1 - lb);
    std::copy(acc, acc + count, out + lb);
  }
}

namespace {

template <typename T, bool FirstMoment>
void moments_impl(const T* u, const T* x, int64_t N, int64_t L, double* moments, int64_t b, int64_t l0,
                  int64_t l1) {
  constexpr int64_t Tile = kVandermondeTile;
  constexpr int64_t W = Tile;             // lanes per pass: 4 accumulators x 64 lanes stay in registers
  constexpr int64_t Group = 32;           // blocks whose u, l*u (2 x 32 x 64 values) stay in L1
  const T* ub = u + b * L;
  const T* xb = x + 2 * b * N;
  std::vector<T> E_re, E_im;
  build_table(xb, N, E_re, E_im);
  Seeds seeds(xb, N, Reseed<T>::blocks);
  // G_n[t] = sum_blocks s_n u[l0+t];  H_n[t] = sum_blocks s_n (l0+t) u[l0+t]
  std::vector<T> G_re(N * Tile, 0), G_im(N * Tile, 0), H_re(FirstMoment ? N * Tile : 0, 0),
      H_im(FirstMoment ? N * Tile : 0, 0);
  std::vector<T> uu(Group * Tile), lu(Group * Tile), S_re(Group * N), S_im(Group * N);
  const int64_t blocks = (l1 - l0 + Tile - 1) / Tile;
  for (int64_t g0 = 0; g0 < blocks; g0 += Group) {
    const int64_t nb = std::min(Group, blocks - g0);
    // This group's inputs, zero-padded past l1, and its seeds S[block][n].
    const int64_t first = l0 + g0 * Tile, valid = std::min(nb * Tile, l1 - first);
    std::copy(ub + first, ub + first + valid, uu.begin());
    std::fill(uu.begin() + valid, uu.begin() + nb * Tile, T(0));
#pragma omp simd
    for (int64_t i = 0; i < nb * Tile; ++i) lu[i] = T(first + i) * uu[i];
    for (int64_t j = 0; j < nb; ++j) {
      seeds.at(l0 + (g0 + j) * Tile, g0 + j);
      for (int64_t n = 0; n < N; ++n) {
        S_re[j * N + n] = T(seeds.re[n]);
        S_im[j * N + n] = T(seeds.im[n]);
      }
    }
    // Per (n, lane chunk) the four accumulators stay in registers across the group's blocks.
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t tc = 0; tc < Tile; tc += W) {
        alignas(64) T gr[W], gi[W], hr[W], hi[W];
        for (int64_t t = 0; t < W; ++t) {
          gr[t] = G_re[n * Tile + tc + t];
          gi[t] = G_im[n * Tile + tc + t];
          if (FirstMoment) {
            hr[t] = H_re[n * Tile + tc + t];
            hi[t] = H_im[n * Tile + tc + t];
          }
        }
        for (int64_t j = 0; j < nb; ++j) {
          const T sr = S_re[j * N + n], si = S_im[j * N + n];
          const T* uj = uu.data() + j * Tile + tc;
          const T* lj = lu.data() + j * Tile + tc;
#pragma omp simd aligned(gr, gi, hr, hi : 64)
          for (int64_t t = 0; t < W; ++t) {
            gr[t] += sr * uj[t];
            gi[t] += si * uj[t];
            if (FirstMoment) {
              hr[t] += sr * lj[t];
              hi[t] += si * lj[t];
            }
          }
        }
        for (int64_t t = 0; t < W; ++t) {
          G_re[n * Tile + tc + t] = gr[t];
          G_im[n * Tile + tc + t] = gi[t];
          if (FirstMoment) {
            H_re[n * Tile + tc + t] = hr[t];
            H_im[n * Tile + tc + t] = hi[t];
          }
        }
      }
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    double p0_re = 0, p0_im = 0, p1_re = 0, p1_im = 0;
    for (int64_t t = 0; t < Tile; ++t) {
      const double er = E_re[n * Tile + t], ei = E_im[n * Tile + t];
      const double g_re = G_re[n * Tile + t], g_im = G_im[n * Tile + t];
      p0_re += er * g_re - ei * g_im;
      p0_im += er * g_im + ei * g_re;
      if (FirstMoment) {
        const double h_re = H_re[n * Tile + t], h_im = H_im[n * Tile + t];
        p1_re += er * h_re - ei * h_im;
        p1_im += er * h_im + ei * h_re;
      }
    }
    moments[4 * n + 0] += p0_re;
    moments[4 * n + 1] += p0_im;
    if (FirstMoment) {
      moments[4 * n + 2] += p1_re;
      moments[4 * n + 3] += p1_im;
    }
  }
}

}  // namespace

template <typename T>
void vandermonde_moments_slice(const T* u, const T* x, int64_t N, int64_t L, bool first_moment, double* moments,
                               int64_t b, int64_t l0, int64_t l1) {
  if (first_moment)
    moments_impl<T, true>(u, x, N, L, moments, b, l0, l1);
  else
    moments_impl<T, false>(u, x, N, L, moments, b, l0, l1);
}

template void log_vandermonde_slice<float>(const float*, const float*, int64_t, int64_t, float*, int64_t, int64_t,
                                           int64_t);
template void log_vandermonde_slice<double>(const double*, const double*, int64_t, int64_t, double*, int64_t,
                                            int64_t, int64_t);
template void vandermonde_moments_slice<float>(const float*, const float*, int64_t, int64_t, bool, double*,
                                               int64_t, int64_t, int64_t);
template void vandermonde_moments_slice<double>(const double*, const double*, int64_t, int64_t, bool, double*,
                                                int64_t, int64_t, int64_t);

}  // namespace s4lib_cpu
