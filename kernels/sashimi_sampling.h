// The sampling rule of the WaveformAR engine on one row of logits (rule: sashimi/pipelines/fast_step.py).
//
// sample_row() draws a token from float32 logits with a given uniform, in float64 with the operations
// and summation order the rule states; sample_batch() applies it to (B, V) logits (for the tests).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace sashimi_step {

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

// See the rule in sashimi/pipelines/fast_step.py. Returns the token; *logprob = log_softmax(logits)[token].
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

// Sampling on given logits (B, V) (for tests of the rule): tokens (B,), logprobs (B,).
static void sample(at::Tensor logits, at::Tensor uniforms, double temperature, int64_t top_k, double top_p,
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
    tokens.data_ptr<int64_t>()[b] = sample_row(logits.data_ptr<float>() + b * V, V,
                                                       uniforms.data_ptr<double>()[b], temperature, top_k, top_p,
                                                       sc, &lp);
    logprobs.data_ptr<double>()[b] = lp;
  }
}

}  // namespace sashimi_step
