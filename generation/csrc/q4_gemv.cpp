// int4-weight x int8-activation matrix-vector products for CPU decode steps (AVX2).
//
// torch's weight-only int4 kernel converts every weight to float before multiplying; on a
// 2-core CPU that makes a decode step compute-bound at about half of llama.cpp's speed.
// Here, as in llama.cpp's Q4 x Q8 dot products, the activations are quantized to int8 per
// block of 32 and the products are summed in integers (maddubs + madd), so one 256-bit
// instruction pair does 32 multiply-adds; floats appear once per block of 32.
//
// Weight layout, per output row n:
//   qs [N, K/2] uint8: block b of 32 inputs is 16 bytes; byte j holds input 32b+j in its
//                      low nibble and input 32b+16+j in its high nibble (values 0..15)
//   sm [N, K/g, 2] fp16: per group of g inputs, scale s and minimum m: w = q * s + m
// so  y[n] = sum_g ( s_g * sum_{k in g} q_k x_k  +  m_g * sum_{k in g} x_k ).
// The first sum uses the int8 activations, the second the exact float activations.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 32;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 packed bytes -> 32 bytes, inputs 0..15 in the low lane and 16..31 in the high lane.
inline __m256i expand_nibbles(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  return _mm256_set_m128i(hi, lo);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// x [M, K] float -> xq [M, K] int8, dx [M, K/32] (xq * dx ~ x), xsum [M, K/g] exact sums.
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq,
                          float* dx, float* xsum) {
  const int64_t nb = K / kBlock, ng = K / group;
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = row + b * kBlock;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(p + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
      }
      const float d = hmax(amax) / 127.0f;
      dx[m * nb + b] = d;
      const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        q[i] = _mm256_cvtps_epi32(
            _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      // int32 x 32 -> int8 x 32 in input order (packs interleave 128-bit lanes; permute back).
      __m256i q16a = _mm256_packs_epi32(q[0], q[1]);
      __m256i q16b = _mm256_packs_epi32(q[2], q[3]);
      __m256i q8 = _mm256_packs_epi16(q16a, q16b);
      q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * kBlock), q8);
    }
    for (int64_t g = 0; g < ng; ++g) {
      const float* p = row + g * group;
      __m256 s = _mm256_setzero_ps();
      for (int64_t i = 0; i < group; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(p + i));
      xsum[m * ng + g] = hsum(s);
    }
  }
}

// Rows [n0, n1) of the output for activation rows [m0, m0 + MT).
template <int MT>
void dot_rows(const uint8_t* qs, const uint16_t* sm, const int8_t* xq, const float* dx,
              const float* xsum, float* y, int64_t n0, int64_t n1, int64_t m0, int64_t N,
              int64_t K, int64_t group) {
  const int64_t nb = K / kBlock, ng = K / group, per_group = group / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qs + n * (K / 2);
    const uint16_t* smrow = sm + n * ng * 2;
    __m256 acc[MT];
    float min_acc[MT];
    for (int i = 0; i < MT; ++i) {
      acc[i] = _mm256_setzero_ps();
      min_acc[i] = 0.0f;
    }
    for (int64_t g = 0; g < ng; ++g) {
      const float s = half_to_float(smrow[2 * g]);
      const float mn = half_to_float(smrow[2 * g + 1]);
      for (int i = 0; i < MT; ++i) min_acc[i] += mn * xsum[(m0 + i) * ng + g];
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t b = g * per_group + j;
        const __m256i q = expand_nibbles(qrow + b * (kBlock / 2));
        for (int i = 0; i < MT; ++i) {
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + i) * K + b * kBlock));
          // u8 x s8 -> pairs summed in int16 (|15 * 127 * 2| < 2^15: no saturation),
          // then pairs of int16 summed in int32.
          const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
          const __m256 scale = _mm256_set1_ps(s * dx[(m0 + i) * nb + b]);
          acc[i] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[i]);
        }
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = hsum(acc[i]) + min_acc[i];
  }
}

// x [M, K] float32, qs [N, K/2] uint8, sm [N, K/g, 2] float16 -> [M, N] float32.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sm,
                     int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  TORCH_CHECK(qs.scalar_type() == at::kByte && sm.scalar_type() == at::kHalf,
              "qs must be uint8 and sm float16");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(group % kBlock == 0 && K % group == 0,
              "group must be a multiple of 32 dividing K, got group ", group, " and K ", K);
  TORCH_CHECK(qs.size(1) * 2 == K && sm.size(0) == N && sm.size(1) == K / group,
              "weight shapes do not match K = ", K);
  const at::Tensor xc = x.contiguous();
  const at::Tensor qc = qs.contiguous();
  const at::Tensor sc = sm.contiguous();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({M, K / kBlock}, x.options());
  at::Tensor xsum = at::empty({M, K / group}, x.options());
  at::Tensor y = at::empty({M, N}, x.options());
  quantize_activations(xc.data_ptr<float>(), M, K, group, xq.data_ptr<int8_t>(),
                       dx.data_ptr<float>(), xsum.data_ptr<float>());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float* dxp = dx.data_ptr<float>();
  const float* xsp = xsum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Output rows are independent: split them across the intra-op threads.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dot_rows<4>(qp, sp, xqp, dxp, xsp, yp, n0, n1, m, N, K, group);
    switch (M - m) {
      case 3: dot_rows<3>(qp, sp, xqp, dxp, xsp, yp, n0, n1, m, N, K, group); break;
      case 2: dot_rows<2>(qp, sp, xqp, dxp, xsp, yp, n0, n1, m, N, K, group); break;
      case 1: dot_rows<1>(qp, sp, xqp, dxp, xsp, yp, n0, n1, m, N, K, group); break;
      default: break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(ragqa_q4, m) { m.def("q4_linear(Tensor x, Tensor qs, Tensor sm, int group) -> Tensor"); }

TORCH_LIBRARY_IMPL(ragqa_q4, CPU, m) { m.impl("q4_linear", &q4_linear); }
