// Torch operator bindings for the CPU kernels: the `s4lib_cpu::*` ops called by s4lib/ops/native.py.
//
// Each op checks its arguments, splits the work into (row b, slice of the long axis) items and
// runs them with at::parallel_for (ATen's OpenMP pool, so torch.set_num_threads applies). Sums
// that cross items (gradients reduced over the long axis or over the batch) are collected per item
// or per thread in double and combined at the end, so results do not depend on the thread count
// beyond round-off of that final double sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "s4lib_cpu.h"

namespace {

using namespace s4lib_cpu;

// Denormal operands cost ~100 cycles each on x86; decaying exponentials and tiny Cauchy terms
// produce them. They are far below round-off of any sum they enter, so flush them to zero for the
// duration of a kernel (and restore the caller's mode).
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

void check_complex_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "s4lib_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kComplexFloat || t.scalar_type() == at::kComplexDouble,
              "s4lib_cpu: ", name, " must be complex64 or complex128, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "s4lib_cpu: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// Contiguous memory holding the tensor's values (conjugate/negative views materialised).
at::Tensor dense(const at::Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

// Split [0, L) into slices (multiples of `tile`) so that B * slices gives the pool enough items.
int64_t slice_length(int64_t B, int64_t L, int64_t tile) {
  const int64_t want_items = 4 * at::get_num_threads();
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>((want_items + B - 1) / B, (L + tile - 1) / tile));
  const int64_t len = (L + slices - 1) / slices;
  return std::max<int64_t>(tile, (len + tile - 1) / tile * tile);
}

template <typename T>
const T* real_ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
CauchyProblem<T> cauchy_problem(const at::Tensor& v, const at::Tensor& z_re, const at::Tensor& z_im,
                                 const at::Tensor& w, double z_abs_max) {
  return CauchyProblem<T>{real_ptr<T>(v), real_ptr<T>(w), real_ptr<T>(z_re), real_ptr<T>(z_im),
                          v.size(0),      v.size(1),      z_re.size(0),      z_abs_max};
}

// Rows of w (B, N) grouped by identical content (bitwise), each group cut into chunks of at most
// kMaxSharedRows rows: the Cauchy kernels compute the denominators once per chunk. Without shared
// poles every chunk is one row.
struct RowChunks {
  std::vector<int64_t> rows;     // row indices, chunk after chunk
  std::vector<int64_t> offsets;  // chunk c is rows[offsets[c] .. offsets[c + 1])
  int64_t count() const { return static_cast<int64_t>(offsets.size()) - 1; }
};

template <typename T>
RowChunks chunk_rows_by_poles(const T* w, int64_t B, int64_t N) {
  const size_t bytes = sizeof(T) * 2 * N;
  std::unordered_map<uint64_t, std::vector<std::vector<int64_t>>> by_hash;
  for (int64_t b = 0; b < B; ++b) {
    const unsigned char* row = reinterpret_cast<const unsigned char*>(w + 2 * b * N);
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < bytes; ++i) h = (h ^ row[i]) * 1099511628211ull;
    auto& bucket = by_hash[h];
    std::vector<int64_t>* group = nullptr;
    for (auto& candidate : bucket)
      if (std::memcmp(w + 2 * candidate[0] * N, row, bytes) == 0) group = &candidate;
    if (group == nullptr) {
      bucket.emplace_back();
      group = &bucket.back();
    }
    group->push_back(b);
  }
  std::vector<std::vector<int64_t>*> groups;
  for (auto& entry : by_hash)
    for (auto& group : entry.second) groups.push_back(&group);
  std::sort(groups.begin(), groups.end(), [](auto* a, auto* b) { return a->front() < b->front(); });
  RowChunks chunks;
  chunks.offsets.push_back(0);
  for (auto* group : groups)
    for (size_t i = 0; i < group->size(); i += kMaxSharedRows) {
      const size_t end = std::min(group->size(), i + kMaxSharedRows);
      chunks.rows.insert(chunks.rows.end(), group->begin() + i, group->begin() + end);
      chunks.offsets.push_back(static_cast<int64_t>(chunks.rows.size()));
    }
  return chunks;
}

void check_cauchy_args(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w) {
  check_complex_cpu(v, "v", 2);
  check_complex_cpu(w, "w", 2);
  check_complex_cpu(z, "z", 1);
  TORCH_CHECK(v.sizes() == w.sizes(), "s4lib_cpu: v and w must have the same shape (B, N), got ", v.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(v.scalar_type() == z.scalar_type() && v.scalar_type() == w.scalar_type(),
              "s4lib_cpu: v, z, w must share one dtype");
}

at::Tensor cauchy_forward(const at::Tensor& v_in, const at::Tensor& z_in, const at::Tensor& w_in) {
  check_cauchy_args(v_in, z_in, w_in);
  const at::Tensor v = dense(v_in), w = dense(w_in), z = dense(z_in);
  const int64_t B = v.size(0), L = z.size(0);
  at::Tensor r = at::empty({B, L}, v.options());
  if (B == 0 || L == 0) return r;
  if (v.size(1) == 0) return r.zero_();
  const at::Tensor z_re = at::real(z).contiguous(), z_im = at::imag(z).contiguous();
  const double z_abs_max = z.abs().max().item<double>();
  AT_DISPATCH_FLOATING_TYPES(z_re.scalar_type(), "s4lib_cpu::cauchy_forward", [&] {
    const auto problem = cauchy_problem<scalar_t>(v, z_re, z_im, w, z_abs_max);
    const RowChunks chunks = chunk_rows_by_poles(problem.w, B, v.size(1));
    const int64_t C = chunks.count();
    const int64_t slice = slice_length(C, L, kCauchyTile), slices = (L + slice - 1) / slice;
    scalar_t* out = reinterpret_cast<scalar_t*>(r.data_ptr());
    at::parallel_for(0, C * slices, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / slices, k0 = (item % slices) * slice;
        const int64_t* rows = chunks.rows.data() + chunks.offsets[c];
        cauchy_forward_slice(problem, out, rows, chunks.offsets[c + 1] - chunks.offsets[c], k0,
                             std::min(L, k0 + slice));
      }
    });
  });
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cauchy_backward(const at::Tensor& grad_in, const at::Tensor& v_in,
                                                               const at::Tensor& z_in, const at::Tensor& w_in,
                                                               bool need_vw, bool need_z) {
  check_cauchy_args(v_in, z_in, w_in);
  check_complex_cpu(grad_in, "grad", 2);
  const at::Tensor v = dense(v_in), w = dense(w_in), z = dense(z_in);
  const int64_t B = v.size(0), N = v.size(1), L = z.size(0);
  TORCH_CHECK(grad_in.size(0) == B && grad_in.size(1) == L, "s4lib_cpu: grad must have shape (B, L) = (", B,
              ", ", L, "), got ", grad_in.sizes());
  const at::Tensor g = dense(grad_in.to(v.scalar_type()));
  at::Tensor grad_v = need_vw ? at::zeros({B, N}, v.options()) : at::empty({0}, v.options());
  at::Tensor grad_w = need_vw ? at::zeros({B, N}, v.options()) : at::empty({0}, v.options());
  at::Tensor grad_z = need_z ? at::zeros({L}, v.options()) : at::empty({0}, v.options());
  if (!(need_vw || need_z) || B == 0 || N == 0 || L == 0) return {grad_v, grad_w, grad_z};

  const at::Tensor z_re = at::real(z).contiguous(), z_im = at::imag(z).contiguous();
  const double z_abs_max = z.abs().max().item<double>();
  const int64_t threads = at::get_num_threads();
  std::vector<double> gz(need_z ? threads * 2 * L : 0, 0.0);  // per thread: re[L], im[L]

  AT_DISPATCH_FLOATING_TYPES(z_re.scalar_type(), "s4lib_cpu::cauchy_backward", [&] {
    const auto problem = cauchy_problem<scalar_t>(v, z_re, z_im, w, z_abs_max);
    const RowChunks chunks = chunk_rows_by_poles(problem.w, B, N);
    const int64_t C = chunks.count();
    const int64_t slice = slice_length(C, L, 4 * kCauchyTile), slices = (L + slice - 1) / slice;
    // Per slice s and row b: N x 4 partial sums at ((s * B + b) * N + n) * 4.
    std::vector<double> sums(need_vw ? slices * B * 4 * N : 0, 0.0);
    const scalar_t* gp = real_ptr<scalar_t>(g);
    at::parallel_for(0, C * slices, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      const int64_t thread = std::min<int64_t>(at::get_thread_num(), threads - 1);
      double* gz_re = need_z ? gz.data() + thread * 2 * L : nullptr;
      double* gz_im = need_z ? gz_re + L : nullptr;
      std::vector<double> chunk_sums(need_vw ? kMaxSharedRows * 4 * N : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / slices, s = item % slices, k0 = s * slice;
        const int64_t* rows = chunks.rows.data() + chunks.offsets[c];
        const int64_t count = chunks.offsets[c + 1] - chunks.offsets[c];
        std::fill(chunk_sums.begin(), chunk_sums.end(), 0.0);
        cauchy_backward_slice(problem, gp, rows, count, k0, std::min(L, k0 + slice),
                              need_vw ? chunk_sums.data() : nullptr, gz_re, gz_im);
        if (need_vw)
          for (int64_t j = 0; j < count; ++j)
            std::copy(chunk_sums.begin() + j * 4 * N, chunk_sums.begin() + (j + 1) * 4 * N,
                      sums.begin() + (s * B + rows[j]) * 4 * N);
      }
    });
    if (need_vw) {
      // grad_v = SV, grad_w = conj(v) SW, summed over the slices of each row.
      auto gv = grad_v.accessor<c10::complex<scalar_t>, 2>();
      auto gw = grad_w.accessor<c10::complex<scalar_t>, 2>();
      auto va = v.accessor<c10::complex<scalar_t>, 2>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) {
          double sv_re = 0, sv_im = 0, sw_re = 0, sw_im = 0;
          for (int64_t s = 0; s < slices; ++s) {
            const double* q = sums.data() + ((s * B + b) * N + n) * 4;
            sv_re += q[0];
            sv_im += q[1];
            sw_re += q[2];
            sw_im += q[3];
          }
          const double vr = va[b][n].real(), vi = va[b][n].imag();
          gv[b][n] = c10::complex<scalar_t>(scalar_t(sv_re), scalar_t(sv_im));
          gw[b][n] = c10::complex<scalar_t>(scalar_t(vr * sw_re + vi * sw_im), scalar_t(vr * sw_im - vi * sw_re));
        }
    }
    if (need_z) {
      auto gza = grad_z.accessor<c10::complex<scalar_t>, 1>();
      for (int64_t k = 0; k < L; ++k) {
        double re = 0, im = 0;
        for (int64_t t = 0; t < threads; ++t) {
          re += gz[t * 2 * L + k];
          im += gz[t * 2 * L + L + k];
        }
        gza[k] = c10::complex<scalar_t>(scalar_t(re), scalar_t(im));
      }
    }
  });
  return {grad_v, grad_w, grad_z};
}

at::Tensor log_vandermonde(const at::Tensor& v_in, const at::Tensor& x_in, int64_t L) {
  check_complex_cpu(v_in, "v", 2);
  check_complex_cpu(x_in, "x", 2);
  TORCH_CHECK(v_in.sizes() == x_in.sizes(), "s4lib_cpu: v and x must have the same shape (B, N), got ",
              v_in.sizes(), " and ", x_in.sizes());
  TORCH_CHECK(v_in.scalar_type() == x_in.scalar_type(), "s4lib_cpu: v and x must share one dtype");
  TORCH_CHECK(L >= 0, "s4lib_cpu: L must be >= 0, got ", L);
  const at::Tensor v = dense(v_in), x = dense(x_in);
  const int64_t B = v.size(0), N = v.size(1);
  at::Tensor K = at::empty({B, L}, at::real(v).options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || L == 0) return K;
  if (N == 0) return K.zero_();
  const int64_t slice = slice_length(B, L, kVandermondeTile), slices = (L + slice - 1) / slice;
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "s4lib_cpu::log_vandermonde", [&] {
    const scalar_t* vp = real_ptr<scalar_t>(v);
    const scalar_t* xp = real_ptr<scalar_t>(x);
    scalar_t* out = K.data_ptr<scalar_t>();
    at::parallel_for(0, B * slices, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / slices, l0 = (item % slices) * slice;
        log_vandermonde_slice(vp, xp, N, L, out, b, l0, std::min(L, l0 + slice));
      }
    });
  });
  return K;
}

std::tuple<at::Tensor, at::Tensor> vandermonde_moments(const at::Tensor& u_in, const at::Tensor& x_in,
                                                       bool first_moment) {
  check_complex_cpu(x_in, "x", 2);
  TORCH_CHECK(u_in.device().is_cpu() && u_in.dim() == 2, "s4lib_cpu: u must be a 2-D CPU tensor (B, L)");
  TORCH_CHECK(u_in.size(0) == x_in.size(0), "s4lib_cpu: u (B, L) and x (B, N) must share B, got ", u_in.sizes(),
              " and ", x_in.sizes());
  const at::Tensor x = dense(x_in);
  const at::Tensor u = dense(u_in.to(at::real(x).scalar_type()));
  const int64_t B = x.size(0), N = x.size(1), L = u.size(1);
  at::Tensor P0 = at::zeros({B, N}, x.options());
  at::Tensor P1 = first_moment ? at::zeros({B, N}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || N == 0 || L == 0) return {P0, P1};
  const int64_t slice = slice_length(B, L, kVandermondeTile), slices = (L + slice - 1) / slice;
  std::vector<double> sums(B * slices * 4 * N, 0.0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "s4lib_cpu::vandermonde_moments", [&] {
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* xp = real_ptr<scalar_t>(x);
    at::parallel_for(0, B * slices, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals flush;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / slices, l0 = (item % slices) * slice;
        vandermonde_moments_slice(up, xp, N, L, first_moment, sums.data() + item * 4 * N, b, l0,
                                  std::min(L, l0 + slice));
      }
    });
    auto p0 = P0.accessor<c10::complex<scalar_t>, 2>();
    c10::complex<scalar_t>* p1 = first_moment ? P1.data_ptr<c10::complex<scalar_t>>() : nullptr;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n) {
        double acc[4] = {0, 0, 0, 0};
        for (int64_t s = 0; s < slices; ++s)
          for (int i = 0; i < 4; ++i) acc[i] += sums[((b * slices + s) * N + n) * 4 + i];
        p0[b][n] = c10::complex<scalar_t>(scalar_t(acc[0]), scalar_t(acc[1]));
        if (p1) p1[b * N + n] = c10::complex<scalar_t>(scalar_t(acc[2]), scalar_t(acc[3]));
      }
  });
  return {P0, P1};
}

}  // namespace

TORCH_LIBRARY(s4lib_cpu, m) {
  m.def("cauchy_forward(Tensor v, Tensor z, Tensor w) -> Tensor");
  m.def("cauchy_backward(Tensor grad, Tensor v, Tensor z, Tensor w, bool need_vw, bool need_z) -> (Tensor, Tensor, Tensor)");
  m.def("log_vandermonde(Tensor v, Tensor x, int L) -> Tensor");
  m.def("vandermonde_moments(Tensor u, Tensor x, bool first_moment) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(s4lib_cpu, CPU, m) {
  m.impl("cauchy_forward", &cauchy_forward);
  m.impl("cauchy_backward", &cauchy_backward);
  m.impl("log_vandermonde", &log_vandermonde);
  m.impl("vandermonde_moments", &vandermonde_moments);
}
