// Attention of one new token per sequence over its KV cache (float32 or bfloat16, summed in
// float32), for CPU decode steps.
//
// torch's matmuls for one query row per head (q @ K^T, softmax, p @ V) took 181 us a layer
// for the 1.5B model's heads at a 640-token context, this 86 us (machine J): they are
// built for larger blocks, and each of their passes reads its operands again. Here one task
// per (sequence, key/value head) computes the scores of every query head that shares that
// head, the softmax and the weighted sum of values, reading K once and V from the core's
// cache. Tasks run on torch's intra-op threads.
//
// q [B, Hq, D], k and v [B, Hkv, T, D] with contiguous rows (any other strides: the
// caches are views into buffers with spare room), mask [B, T] bool (true = attend) or
// none -> out [B, Hq, D] float32; q is float32. A bfloat16 cache is widened in registers
// as it is read (a bfloat16 is the high half of a float32): the Python fallback copied the
// whole cache to float32 every step. Query head j reads key/value head j / (Hq / Hkv), as
// transformers' repeat_kv does. Rows that are masked out get a weight of exactly zero and
// are never read, so what padding holds cannot reach the output.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// 8 bfloat16 (their raw bits) -> 8 float32, exactly.
inline __m256 load8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for x <= 0 (scores minus their maximum), within 2 ulp of expf for x >= -87.
// Below that, and for -inf (a masked position), the result is 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  // x = n ln2 + r, |r| <= ln2 / 2; ln2 split in two so n * ln2 loses no bits.
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // e^r by its degree-7 polynomial (Cephes' expf coefficients).
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // times 2^n, built in the exponent bits (n >= -126 here, so 2^n is a normal float).
  const __m256i pow2n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
  return _mm256_andnot_ps(zero_below, result);
}

// scores[g][t] = scale * <q_g, k_t> for NG query heads at once; -inf where masked.
template <int NG, typename KV>
void head_scores(const float* q, int64_t D, const KV* k, int64_t k_stride, int64_t T,
                 const bool* mask, float scale, float* scores, int64_t score_stride) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    if (mask != nullptr && !mask[t]) {
      for (int g = 0; g < NG; ++g) scores[g * score_stride + t] = neg_inf;
      continue;
    }
    const KV* kt = k + t * k_stride;
    __m256 acc[NG];
    for (int g = 0; g < NG; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(kt + d);
      for (int g = 0; g < NG; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
    }
    for (int g = 0; g < NG; ++g) scores[g * score_stride + t] = hsum8(acc[g]) * scale;
  }
}

// Softmax numerators in place (e^(s - max)); returns their sum.
float exponentiate(float* s, int64_t T) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    if (s[t] > mx || std::isnan(s[t])) mx = s[t];
    if (std::isnan(mx)) break;
  }
  if (std::isnan(mx)) {  // a NaN score (a NaN query or key) makes the output NaN, as in torch
    for (int64_t t = 0; t < T; ++t) s[t] = mx;
    return mx;
  }
  if (mx == -std::numeric_limits<float>::infinity()) {  // every position masked: no weights
    for (int64_t t = 0; t < T; ++t) s[t] = 0.0f;
    return 0.0f;
  }
  const __m256 vmax = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmax));
    _mm256_storeu_ps(s + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum8(vsum);
  if (t < T) {
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = t + i < T ? s[t + i] : -std::numeric_limits<float>::infinity();
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(tail), vmax));
    _mm256_store_ps(tail, e);
    for (int i = 0; t + i < T; ++i) {
      s[t + i] = tail[i];
      sum += tail[i];
    }
  }
  return sum;
}

// out[g][d0 : d0 + 8 NC] = sum_t p[g][t] v_t[d0 : d0 + 8 NC] / denom[g] for NG heads:
// NG x NC accumulators stay in registers (at most 12 of the 16).
template <int NG, int NC, typename KV>
void weighted_values(const float* p, int64_t p_stride, const KV* v, int64_t v_stride,
                     int64_t T, const bool* mask, const float* denom, int64_t d0, float* out,
                     int64_t D) {
  __m256 acc[NG][NC];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    if (mask != nullptr && !mask[t]) continue;
    const KV* vt = v + t * v_stride + d0;
    __m256 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load8(vt + 8 * c);
    for (int g = 0; g < NG; ++g) {
      const __m256 w = _mm256_broadcast_ss(p + g * p_stride + t);
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm256_fmadd_ps(w, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    // 0 when every position was masked; NaN stays NaN (NaN * 0).
    const __m256 inv = _mm256_set1_ps(denom[g] > 0.0f ? 1.0f / denom[g] : 0.0f);
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + g * D + d0 + 8 * c, _mm256_mul_ps(acc[g][c], inv));
  }
}

template <int NG, typename KV>
void weighted_values_chunks(const float* p, int64_t p_stride, const KV* v, int64_t v_stride,
                            int64_t T, const bool* mask, const float* denom, float* out,
                            int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) weighted_values<NG, 4>(p, p_stride, v, v_stride, T, mask, denom, d0, out, D);
  for (; d0 < D; d0 += 8) weighted_values<NG, 1>(p, p_stride, v, v_stride, T, mask, denom, d0, out, D);
}

// One (sequence, key/value head): its G query heads, rows q [G, D] -> out [G, D].
template <typename KV>
void attend_group(const float* q, int64_t G, int64_t D, const KV* k, const KV* v,
                  int64_t k_stride, int64_t v_stride, int64_t T, const bool* mask, float scale,
                  float* out) {
  std::vector<float> scores(static_cast<size_t>(G * T));
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) head_scores<4>(q + g * D, D, k, k_stride, T, mask, scale, scores.data() + g * T, T);
  switch (G - g) {
    case 3: head_scores<3>(q + g * D, D, k, k_stride, T, mask, scale, scores.data() + g * T, T); break;
    case 2: head_scores<2>(q + g * D, D, k, k_stride, T, mask, scale, scores.data() + g * T, T); break;
    case 1: head_scores<1>(q + g * D, D, k, k_stride, T, mask, scale, scores.data() + g * T, T); break;
    default: break;
  }
  std::vector<float> denom(static_cast<size_t>(G));
  for (g = 0; g < G; ++g) denom[g] = exponentiate(scores.data() + g * T, T);
  for (g = 0; g + 3 <= G; g += 3) {
    weighted_values_chunks<3>(scores.data() + g * T, T, v, v_stride, T, mask, denom.data() + g, out + g * D, D);
  }
  switch (G - g) {
    case 2: weighted_values_chunks<2>(scores.data() + g * T, T, v, v_stride, T, mask, denom.data() + g, out + g * D, D); break;
    case 1: weighted_values_chunks<1>(scores.data() + g * T, T, v, v_stride, T, mask, denom.data() + g, out + g * D, D); break;
    default: break;
  }
}

}  // namespace

// Called by decode_layer.cpp too.
namespace ragqa {

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.dim() == 4,
              "query must be [B, Hq, D] and key, value [B, Hkv, T, D]");
  TORCH_CHECK(query.scalar_type() == at::kFloat, "query must be float32");
  TORCH_CHECK(key.scalar_type() == value.scalar_type() &&
                  (key.scalar_type() == at::kFloat || key.scalar_type() == at::kBFloat16),
              "key and value must both be float32 or both bfloat16");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = key.size(1), T = key.size(2);
  TORCH_CHECK(D % 8 == 0, "head size must be a multiple of 8, got ", D);
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == B && key.size(3) == D,
              "key and value must both be [", B, ", Hkv, T, ", D, "]");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1, "key and value rows must be contiguous");
  const bool* mp = nullptr;
  at::Tensor mc;
  if (mask.has_value()) {
    mc = mask->contiguous();
    TORCH_CHECK(mc.scalar_type() == at::kBool && mc.dim() == 2 && mc.size(0) == B && mc.size(1) == T,
                "mask must be [", B, ", ", T, "] bool");
    mp = mc.data_ptr<bool>();
  }
  const at::Tensor qc = query.contiguous();
  at::Tensor out = at::empty({B, Hq, D}, query.options());
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t G = Hq / Hkv;
  auto run = [&](const auto* kp, const auto* vp) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv;
        attend_group(qp + (b * Hq + h * G) * D, G, D, kp + b * key.stride(0) + h * key.stride(1),
                     vp + b * value.stride(0) + h * value.stride(1), key.stride(2),
                     value.stride(2), T, mp != nullptr ? mp + b * T : nullptr,
                     static_cast<float>(scale), op + (b * Hq + h * G) * D);
      }
    });
  };
  if (key.scalar_type() == at::kFloat) {
    run(key.data_ptr<float>(), value.data_ptr<float>());
  } else {
    run(reinterpret_cast<const uint16_t*>(key.data_ptr<at::BFloat16>()),
        reinterpret_cast<const uint16_t*>(value.data_ptr<at::BFloat16>()));
  }
  return out;
}

}  // namespace ragqa

TORCH_LIBRARY_FRAGMENT(ragqa_qmatmul, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) { m.impl("decode_attention", &ragqa::decode_attention); }
