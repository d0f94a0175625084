// The recurrent step of one S4 / S4D layer on float32 rows: the single implementation used by
// s4lib's fused FFTConv / S4Block step (s4_step_cpu.cpp) and by the WaveformAR engine
// (sashimi_step_cpu.cpp). s4lib/fused_step.py packs the parameters (pack_ssm) for both.
//
// State: per row, H channels of n complex numbers interleaved (re, im), i.e. the memory of a
// complex64 (B, H, n) tensor as s4lib's default_state() makes it: channel h of row b starts at
// float (b H + h) 2n. Vector lanes run over the state index (8 complex numbers per vector).
//
//   S4D:  x' = dA x + dB u;                                     y = 2 Re sum_k C x'
//   S4 (DPLR, the Woodbury 'linear' step of rank r in one pass over the state; FE = F E,
//   FdtB = F dtB, G = F Pd, QFE = Qc FE, K1_ij = 2 Re sum Qc_i G_j, K2_i = 2 Re sum Qc_i FdtB):
//         q_j = 2 Re sum Qc_j x,  a_j = 2 Re sum QFE_j x            (aux: kept from the last step)
//         q2 = a - K1 q + K2 u;  q3 = M q2;  x' = FE x + FdtB u - sum_j G_j (q_j + q3_j)
//         y = 2 Re sum C x';  q', a' of x' accumulated in the same pass
//   output s = act(y + D u)
//
// Parameters per channel h: par[h][plane][npad] with npad = roundup(2n, VL), padding zero:
//   S4D planes:  dA, dB, C*                 S4 planes: FE, FdtB, C*, then per rank j: G_j, Qc*_j, QFE*_j
// (complex, interleaved; a plane marked * holds (Re c, -Im c) so that Re(c x) is a plain dot product),
// and chan[h][chans] scalars:  S4D: D;  S4: D, M (r x r), K1 (r x r), K2 (r).
#pragma once

#include "step_simd.h"

namespace s4step {

enum Kind : int64_t { kDiag = 0, kDPLR = 1 };
enum Act : int64_t { kIdentity = 0, kGELU = 1, kTanh = 2, kReLU = 3, kSiLU = 4, kSigmoid = 5 };
constexpr int64_t kMaxRank = 4;

struct SSM {
  int64_t kind = kDiag, rank = 0, H = 0, n = 0, npad = 0, planes = 0, chans = 0, act = kGELU;
  const float* par = nullptr;   // (H, planes, npad)
  const float* chan = nullptr;  // (H, chans)
};

static inline int64_t ssm_planes(int64_t kind, int64_t rank) { return kind == kDiag ? 3 : 3 + 3 * rank; }
static inline int64_t ssm_chans(int64_t kind, int64_t rank) { return kind == kDiag ? 1 : 1 + 2 * rank * rank + rank; }

// Horizontal sum by halving (the lanes' order of addition is fixed: results do not depend on threads).
static inline float hsum_tree(vf v) {
  const vi h8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const vi h4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const vi h2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const vi h1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  v += __builtin_shuffle(v, h8);
  v += __builtin_shuffle(v, h4);
  v += __builtin_shuffle(v, h2);
  v += __builtin_shuffle(v, h1);
  return v[0];
}

// The four horizontal sums of a, b, c, d at once (13 vector operations instead of 4 x 8).
static inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
  const vi lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vf ab = __builtin_shuffle(a, b, lo8) + __builtin_shuffle(a, b, hi8);  // a: lanes 0-7, b: 8-15
  const vf cd = __builtin_shuffle(c, d, lo8) + __builtin_shuffle(c, d, hi8);
  const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  vf v = __builtin_shuffle(ab, cd, lo4) + __builtin_shuffle(ab, cd, hi4);  // a, b, c, d: 4 lanes each
  const vi h2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const vi h1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  v += __builtin_shuffle(v, h2);
  v += __builtin_shuffle(v, h1);
  out[0] = v[0], out[1] = v[4], out[2] = v[8], out[3] = v[12];
}

static inline float scalar_act(float v, int64_t act) {
  switch (act) {
    case kGELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752440f));
    case kTanh: return std::tanh(v);
    case kReLU: return v > 0.0f ? v : 0.0f;
    case kSiLU: return v / (1.0f + std::exp(-v));
    case kSigmoid: return 1.0f / (1.0f + std::exp(-v));
    default: return v;
  }
}

// One vector lane group of the state: full vector, or the last m < VL floats of a channel.
static inline vf xload(const float* p, int64_t m) { return m >= VL ? vload(p) : vload_part(p, m); }
static inline void xstore(float* p, vf v, int64_t m) {
  if (m >= VL) vstore(p, v); else vstore_part(p, v, m);
}

// q_j, a_j of the state x (one row, one channel) into aux[0 .. 2r).
static inline void dplr_aux(const SSM& m, const float* par, const float* x, float* aux) {
  const int64_t np = 2 * m.n, P = m.npad;
  for (int64_t j = 0; j < m.rank; ++j) {
    const float* Qc = par + (3 + 3 * j + 1) * P;
    const float* QFE = Qc + P;
    vf q{}, a{};
    for (int64_t k = 0; k < np; k += VL) {
      const vf xv = xload(x + k, np - k);
      q += vload(Qc + k) * xv;
      a += vload(QFE + k) * xv;
    }
    aux[j] = 2.0f * hsum_tree(q);
    aux[m.rank + j] = 2.0f * hsum_tree(a);
  }
}

// Rows [0, R), channels [h0, h1): u (R, ldu) inputs, x_in / x_out (R, H, 2n) states (may be the same
// memory), aux (R, H, 2 rank) (DPLR; recomputed from x_in first unless have_aux), s (R, lds) outputs
// act(y + D u) for channels h0 <= h < h1 (padding columns of s are not written). A channel's result
// does not depend on the range it is computed in (threads split channels in multiples of VL).
template <int RANK>
static void ssm_rows_impl(const SSM& m, const float* u, int64_t ldu, const float* x_in, float* x_out, float* aux,
                          bool have_aux, float* s, int64_t lds, int64_t R, int64_t h0, int64_t h1) {
  constexpr int MAXR = RANK > 0 ? RANK : kMaxRank;
  const int64_t H = m.H, np = 2 * m.n, P = m.npad, rank = m.kind == kDiag ? 0 : (RANK > 0 ? RANK : m.rank);
  const int64_t stride = m.planes * P;
  // channels outer, rows inner: a channel's parameters (planes x npad floats) stay in L1 across the rows
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t r = 0; r < R; ++r) {
      const float* par = m.par + h * stride;
      const float* ch = m.chan + h * m.chans;
      const float* xi = x_in + (r * H + h) * np;
      float* xo = x_out + (r * H + h) * np;
      const float uh = u[r * ldu + h];
      const vf uv = vsplat(uh);
      vf y{};
      if (m.kind == kDiag) {
        const float *dA = par, *dB = par + P, *C = par + 2 * P;
        for (int64_t k = 0; k < np; k += VL) {
          const int64_t w = np - k;
          const vf nx = cmul(vload(dA + k), xload(xi + k, w)) + vload(dB + k) * uv;
          xstore(xo + k, nx, w);
          y += vload(C + k) * nx;
        }
      } else {
        float* ax = aux + (r * H + h) * 2 * rank;
        if (!have_aux) dplr_aux(m, par, xi, ax);
        const float* M = ch + 1;
        const float* K1 = M + rank * rank;
        const float* K2 = K1 + rank * rank;
        float c[MAXR], q2[MAXR];
        for (int64_t i = 0; i < rank; ++i) {
          q2[i] = ax[rank + i] + K2[i] * uh;
          for (int64_t j = 0; j < rank; ++j) q2[i] -= K1[i * rank + j] * ax[j];
        }
        for (int64_t i = 0; i < rank; ++i) {
          float q3 = 0.0f;
          for (int64_t j = 0; j < rank; ++j) q3 += M[i * rank + j] * q2[j];
          c[i] = ax[i] + q3;
        }
        const float *FE = par, *FdtB = par + P, *C = par + 2 * P;
        vf qn[MAXR], an[MAXR], cv[MAXR];
        for (int64_t i = 0; i < rank; ++i) qn[i] = vf{}, an[i] = vf{}, cv[i] = vsplat(c[i]);
        for (int64_t k = 0; k < np; k += VL) {
          const int64_t w = np - k;
          vf nx = cmul(vload(FE + k), xload(xi + k, w)) + vload(FdtB + k) * uv;
          for (int64_t i = 0; i < rank; ++i) nx -= vload(par + (3 + 3 * i) * P + k) * cv[i];
          xstore(xo + k, nx, w);
          y += vload(C + k) * nx;
          for (int64_t i = 0; i < rank; ++i) {
            qn[i] += vload(par + (4 + 3 * i) * P + k) * nx;
            an[i] += vload(par + (5 + 3 * i) * P + k) * nx;
          }
        }
        // y, q_0.., a_0.. reduced four at a time
        vf acc[2 * MAXR + 4];
        acc[0] = y;
        for (int64_t i = 0; i < rank; ++i) acc[1 + i] = qn[i], acc[1 + rank + i] = an[i];
        const int64_t count = 1 + 2 * rank;
        for (int64_t i = count; i < count + 3; ++i) acc[i] = vf{};
        float sums[2 * MAXR + 4];
        for (int64_t i = 0; i < count; i += 4) hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3], sums + i);
        for (int64_t i = 0; i < 2 * rank; ++i) ax[i] = 2.0f * sums[1 + i];
        s[r * lds + h] = 2.0f * sums[0] + ch[0] * uh;
        continue;
      }
      s[r * lds + h] = 2.0f * hsum_tree(y) + ch[0] * uh;
    }
  }
  const int64_t Hend = h1;
  for (int64_t r = 0; r < R; ++r) {  // activation over each row, vectorised (GELU as in the engine's other layers)
    float* sr = s + r * lds + h0;
    const int64_t H = Hend - h0;
    int64_t h = 0;
    if (m.act == kGELU) {
      for (; h + VL <= H; h += VL) vstore(sr + h, vgelu(vload(sr + h)));
    } else if (m.act == kSiLU) {
      for (; h + VL <= H; h += VL) { const vf v = vload(sr + h); vstore(sr + h, v * vsigmoid(v)); }
    } else if (m.act == kSigmoid) {
      for (; h + VL <= H; h += VL) vstore(sr + h, vsigmoid(vload(sr + h)));
    } else if (m.act == kIdentity) {
      h = H;
    }
    if (m.act == kGELU && h < H) {  // tail through the same vector formula (lanes past H are scratch)
      vf v = vload_part(sr + h, H - h);
      vstore_part(sr + h, vgelu(v), H - h);
      h = H;
    }
    for (; h < H; ++h) sr[h] = scalar_act(sr[h], m.act);
  }
}

static void ssm_rows(const SSM& m, const float* u, int64_t ldu, const float* x_in, float* x_out, float* aux,
                     bool have_aux, float* s, int64_t lds, int64_t R, int64_t h0 = 0, int64_t h1 = -1) {
  if (h1 < 0) h1 = m.H;
  if (h1 <= h0) return;
  if (m.kind == kDiag) return ssm_rows_impl<0>(m, u, ldu, x_in, x_out, aux, have_aux, s, lds, R, h0, h1);
  switch (m.rank) {
    case 1: return ssm_rows_impl<1>(m, u, ldu, x_in, x_out, aux, have_aux, s, lds, R, h0, h1);
    case 2: return ssm_rows_impl<2>(m, u, ldu, x_in, x_out, aux, have_aux, s, lds, R, h0, h1);
    default: return ssm_rows_impl<0>(m, u, ldu, x_in, x_out, aux, have_aux, s, lds, R, h0, h1);
  }
}

// The channels [h0, h1) of the panels [p0, p1) of a width-H layer (VL channels per panel).
static inline std::pair<int64_t, int64_t> panel_channels(std::pair<int64_t, int64_t> panels, int64_t H) {
  return {std::min(panels.first * VL, H), std::min(panels.second * VL, H)};
}

// aux of the states x (B rows) for a DPLR layer (after the state was written from outside).
static void ssm_refresh(const SSM& m, const float* x, float* aux, int64_t B) {
  if (m.kind != kDPLR) return;
  const int64_t np = 2 * m.n, stride = m.planes * m.npad;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < m.H; ++h)
      dplr_aux(m, m.par + h * stride, x + (b * m.H + h) * np, aux + (b * m.H + h) * 2 * m.rank);
}

// x[r, c0 : c1) (+)= a * sigmoid(b) for the GLU halves a = big[r, 0 : Hp), b = big[r, Hp : 2 Hp)
// (c1 < 0: all Hp columns; c0, c1 multiples of VL).
template <bool ACC>
static void glu_rows(const float* big, int64_t ldbig, int64_t Hp, float* x, int64_t ldx, int64_t R, int64_t c0 = 0,
                     int64_t c1 = -1) {
  if (c1 < 0) c1 = Hp;
  for (int64_t r = 0; r < R; ++r) {
    const float* a = big + r * ldbig;
    float* xr = x + r * ldx;
    for (int64_t h = c0; h < c1; h += VL) {
      const vf g = vload(a + h) * vsigmoid(vload(a + Hp + h));
      vstore(xr + h, ACC ? vload(xr + h) + g : g);
    }
  }
}

// ------------------------------------------------------------------------- tiled form (engines)
//
// An engine that owns its recurrent state between calls (the WaveformAR engine) can keep it in
// tiles of VL channels with the lanes over channels: no horizontal sums, no complex shuffles, the
// DPLR corrections on whole vectors. Parameters per tile t: par[t][k][2 planes][VL] for k < n (the
// planes of SSM above, (re, im) as two vectors: a step streams one contiguous block per tile),
// chan[t][chans][VL]; state x[b][t][k][re, im][VL]; DPLR aux[b][t][2 rank][VL]. Channels past H
// are zero (their outputs are 0 before and after GELU). Conversions from and to the complex (B, H, n)
// state below; a channel's results do not depend on the tile range it is computed in.
struct TiledSSM {
  int64_t kind = kDiag, rank = 0, H = 0, tiles = 0, n = 0, planes = 0, chans = 0, act = kGELU;
  const float* par = nullptr;   // (tiles, n, 2 planes, VL)
  const float* chan = nullptr;  // (tiles, chans, VL)
  int64_t state_floats() const { return tiles * n * 2 * VL; }  // per row
  int64_t aux_floats() const { return tiles * 2 * rank * VL; }  // per row
};

// par (tiles * n * 2 planes * VL floats) and chan (tiles * chans * VL) from the packed m.
static TiledSSM tile_ssm(const SSM& m, int64_t tiles, float* par, float* chan) {
  TORCH_CHECK(tiles * VL >= m.H, "s4step: ", tiles, " tiles for ", m.H, " channels");
  TiledSSM t;
  t.kind = m.kind, t.rank = m.rank, t.H = m.H, t.tiles = tiles, t.n = m.n, t.planes = m.planes, t.chans = m.chans;
  t.act = m.act;
  const int64_t n = m.n, P = m.planes;
  std::memset(par, 0, tiles * n * 2 * P * VL * sizeof(float));
  std::memset(chan, 0, tiles * m.chans * VL * sizeof(float));
  for (int64_t h = 0; h < m.H; ++h) {
    const int64_t tt = h / VL, lane = h % VL;
    const float* src = m.par + h * P * m.npad;
    for (int64_t p = 0; p < P; ++p)
      for (int64_t k = 0; k < n; ++k)
        for (int64_t c = 0; c < 2; ++c) par[((tt * n + k) * 2 * P + 2 * p + c) * VL + lane] = src[p * m.npad + 2 * k + c];
    for (int64_t c = 0; c < m.chans; ++c) chan[(tt * m.chans + c) * VL + lane] = m.chan[h * m.chans + c];
  }
  t.par = par, t.chan = chan;
  return t;
}

// Complex (B, H, n) states <-> tiled ones (padding lanes written as zero).
static void tiled_from_complex(const TiledSSM& m, const float* cx, float* tx, int64_t B) {
  const int64_t n = m.n;
  std::memset(tx, 0, B * m.state_floats() * sizeof(float));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < m.H; ++h) {
      const float* src = cx + (b * m.H + h) * 2 * n;
      float* dst = tx + b * m.state_floats() + (h / VL) * n * 2 * VL + h % VL;
      for (int64_t k = 0; k < n; ++k) dst[2 * k * VL] = src[2 * k], dst[(2 * k + 1) * VL] = src[2 * k + 1];
    }
}
static void complex_from_tiled(const TiledSSM& m, const float* tx, float* cx, int64_t B) {
  const int64_t n = m.n;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < m.H; ++h) {
      float* dst = cx + (b * m.H + h) * 2 * n;
      const float* src = tx + b * m.state_floats() + (h / VL) * n * 2 * VL + h % VL;
      for (int64_t k = 0; k < n; ++k) dst[2 * k] = src[2 * k * VL], dst[2 * k + 1] = src[(2 * k + 1) * VL];
    }
}

// Re(c x) of the state for the "*" plane at p (holding (Re c, -Im c)), accumulated as the step does.
static inline vf tiled_dot(const float* par, int64_t planes, int64_t plane, const float* x, int64_t n) {
  vf s0{}, s1{};
  for (int64_t k = 0; k < n; ++k) {
    const float* p = par + (k * 2 * planes + 2 * plane) * VL;
    s0 += vload(p) * vload(x + 2 * k * VL);
    s1 += vload(p + VL) * vload(x + (2 * k + 1) * VL);
  }
  return s0 + s1;
}

// aux of tiled DPLR states (after they were written from outside): the values a step leaves.
static void tiled_refresh(const TiledSSM& m, const float* tx, float* aux, int64_t B) {
  if (m.kind != kDPLR) return;
  const int64_t n = m.n, P = m.planes, r = m.rank;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < m.tiles; ++t) {
      const float* par = m.par + t * n * 2 * P * VL;
      const float* x = tx + b * m.state_floats() + t * n * 2 * VL;
      float* ax = aux + b * m.aux_floats() + t * 2 * r * VL;
      for (int64_t j = 0; j < r; ++j) {
        vstore(ax + j * VL, 2.0f * tiled_dot(par, P, 4 + 3 * j, x, n));
        vstore(ax + (r + j) * VL, 2.0f * tiled_dot(par, P, 5 + 3 * j, x, n));
      }
    }
}

static inline vf vact(vf v, int64_t act) {
  switch (act) {
    case kGELU: return vgelu(v);
    case kSiLU: return v * vsigmoid(v);
    case kSigmoid: return vsigmoid(v);
    case kIdentity: return v;
    default: {
      for (int i = 0; i < VL; ++i) v[i] = scalar_act(v[i], act);
      return v;
    }
  }
}

// Rows [0, R), tiles [t0, t1): u (R, ldu) inputs, x (R, tiles, n, 2, VL) states updated in place,
// aux (R, tiles, 2 rank, VL) (DPLR, kept from the previous step), s (R, lds) = act(y + D u) for the
// tiles' VL columns each (all of them: channels past H give 0).
template <int RANK>
static void ssm_tiled_impl(const TiledSSM& m, const float* __restrict u, int64_t ldu, float* __restrict xs,
                           float* __restrict auxs, float* __restrict s, int64_t lds, int64_t R, int64_t t0, int64_t t1) {
  constexpr int MAXR = RANK > 0 ? RANK : kMaxRank;
  const int64_t n = m.n, P = m.planes, rank = m.kind == kDiag ? 0 : (RANK > 0 ? RANK : m.rank);
  const int64_t sf = m.state_floats(), af = m.aux_floats();
  for (int64_t t = t0; t < t1; ++t) {
    const float* __restrict par = m.par + t * n * 2 * P * VL;
    const float* __restrict ch = m.chan + t * m.chans * VL;
    const vf D = vload(ch);
    for (int64_t r = 0; r < R; ++r) {
      float* __restrict x = xs + r * sf + t * n * 2 * VL;
      const vf uv = vload(u + r * ldu + t * VL);
      vf y0{}, y1{};
      if (m.kind == kDiag) {
        for (int64_t k = 0; k < n; ++k) {
          const float* p = par + k * 6 * VL;
          const vf xr = vload(x + 2 * k * VL), xi = vload(x + (2 * k + 1) * VL);
          const vf ar = vload(p), ai = vload(p + VL);
          const vf nr = ar * xr - ai * xi + vload(p + 2 * VL) * uv;
          const vf ni = ar * xi + ai * xr + vload(p + 3 * VL) * uv;
          vstore(x + 2 * k * VL, nr);
          vstore(x + (2 * k + 1) * VL, ni);
          y0 += vload(p + 4 * VL) * nr;
          y1 += vload(p + 5 * VL) * ni;
        }
      } else {
        float* __restrict ax = auxs + r * af + t * 2 * rank * VL;
        const float* M = ch + VL;
        const float* K1 = M + rank * rank * VL;
        const float* K2 = K1 + rank * rank * VL;
        vf c[MAXR], q2[MAXR];
        for (int64_t i = 0; i < rank; ++i) {
          q2[i] = vload(ax + (rank + i) * VL) + vload(K2 + i * VL) * uv;
          for (int64_t j = 0; j < rank; ++j) q2[i] -= vload(K1 + (i * rank + j) * VL) * vload(ax + j * VL);
        }
        for (int64_t i = 0; i < rank; ++i) {
          vf q3{};
          for (int64_t j = 0; j < rank; ++j) q3 += vload(M + (i * rank + j) * VL) * q2[j];
          c[i] = vload(ax + i * VL) + q3;
        }
        vf q0[MAXR], q1[MAXR], a0[MAXR], a1[MAXR];
        for (int64_t i = 0; i < rank; ++i) q0[i] = q1[i] = a0[i] = a1[i] = vf{};
        for (int64_t k = 0; k < n; ++k) {
          const float* p = par + k * 2 * P * VL;
          const vf xr = vload(x + 2 * k * VL), xi = vload(x + (2 * k + 1) * VL);
          const vf er = vload(p), ei = vload(p + VL);
          vf nr = er * xr - ei * xi + vload(p + 2 * VL) * uv;
          vf ni = er * xi + ei * xr + vload(p + 3 * VL) * uv;
          for (int64_t i = 0; i < rank; ++i) {
            const float* g = p + (6 + 6 * i) * VL;
            nr -= vload(g) * c[i];
            ni -= vload(g + VL) * c[i];
          }
          vstore(x + 2 * k * VL, nr);
          vstore(x + (2 * k + 1) * VL, ni);
          y0 += vload(p + 4 * VL) * nr;
          y1 += vload(p + 5 * VL) * ni;
          for (int64_t i = 0; i < rank; ++i) {
            const float* g = p + (6 + 6 * i) * VL;
            q0[i] += vload(g + 2 * VL) * nr;
            q1[i] += vload(g + 3 * VL) * ni;
            a0[i] += vload(g + 4 * VL) * nr;
            a1[i] += vload(g + 5 * VL) * ni;
          }
        }
        for (int64_t i = 0; i < rank; ++i) {
          vstore(ax + i * VL, 2.0f * (q0[i] + q1[i]));
          vstore(ax + (rank + i) * VL, 2.0f * (a0[i] + a1[i]));
        }
      }
      vstore(s + r * lds + t * VL, vact(2.0f * (y0 + y1) + D * uv, m.act));
    }
  }
}

static void ssm_tiled(const TiledSSM& m, const float* u, int64_t ldu, float* x, float* aux, float* s, int64_t lds,
                      int64_t R, int64_t t0, int64_t t1) {
  if (t1 <= t0) return;
  if (m.kind == kDiag) return ssm_tiled_impl<0>(m, u, ldu, x, aux, s, lds, R, t0, t1);
  switch (m.rank) {
    case 1: return ssm_tiled_impl<1>(m, u, ldu, x, aux, s, lds, R, t0, t1);
    case 2: return ssm_tiled_impl<2>(m, u, ldu, x, aux, s, lds, R, t0, t1);
    default: return ssm_tiled_impl<0>(m, u, ldu, x, aux, s, lds, R, t0, t1);
  }
}

// A checked SSM description from packed tensors (both extensions build theirs with this).
static SSM make_ssm(int64_t kind, int64_t rank, int64_t n, int64_t act, const at::Tensor& par,
                    const at::Tensor& chan) {
  TORCH_CHECK(kind == kDiag || kind == kDPLR, "s4step: unknown SSM kind ", kind);
  TORCH_CHECK(kind == kDiag || (rank >= 1 && rank <= kMaxRank), "s4step: DPLR rank must be in 1..", kMaxRank,
              ", got ", rank);
  TORCH_CHECK(act >= kIdentity && act <= kSigmoid, "s4step: unknown activation ", act);
  SSM m;
  m.kind = kind, m.rank = kind == kDPLR ? rank : 0, m.act = act;
  m.planes = ssm_planes(kind, m.rank), m.chans = ssm_chans(kind, m.rank);
  TORCH_CHECK(par.device().is_cpu() && par.scalar_type() == at::kFloat && par.is_contiguous() && par.dim() == 3 &&
              par.size(1) == m.planes && par.size(2) % VL == 0,
              "s4step: SSM parameters must be contiguous float32 (H, ", m.planes, ", npad), got ", par.sizes());
  TORCH_CHECK(chan.device().is_cpu() && chan.scalar_type() == at::kFloat && chan.is_contiguous() && chan.dim() == 2 &&
              chan.size(0) == par.size(0) && chan.size(1) == m.chans,
              "s4step: channel constants must be contiguous float32 (H, ", m.chans, "), got ", chan.sizes());
  TORCH_CHECK(n >= 1 && par.size(2) == (2 * n + VL - 1) / VL * VL, "s4step: SSM parameters for n = ", n,
              " need npad = ", (2 * n + VL - 1) / VL * VL, ", got ", par.size(2));
  m.H = par.size(0), m.n = n, m.npad = par.size(2);
  m.par = par.data_ptr<float>(), m.chan = chan.data_ptr<float>();
  return m;
}

}  // namespace s4step
