// What the CPU kernels of qmatmul.cpp and q6k_linear.cpp share: the block of int8
// activations, float helpers, the prefetch distance and the split of a matmul into tiles.
// Header-only and inline: each kernel library source includes it (qmatmul.py rebuilds the
// library when it changes, since torch's extension builder hashes only the sources).

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

// Functions compiled for AVX-512 with VNNI, called only where the CPU has it
// (`ragqa::avx512_kernels_on`): the library as a whole is built for AVX2, so it loads on
// every CPU the kernels support.
#define RAGQA_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

namespace ragqa::common {

constexpr int64_t kBlock = 32;  // activations are quantized per block of 32 inputs

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// One block of 32 int8 values (activations or weights), unaligned.
inline __m256i load_block(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 floats (v[0..3]) times inv, rounded to the nearest integer (ties to even), still
// floats, in v's order.
inline void round32(const __m256 v[4], __m256 inv, __m256 t[4]) {
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// 32 integral floats within -128..127 -> 32 int8 in input order.
inline __m256i pack32(const __m256 t[4]) {
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(t[i]);
  // int32 x 32 -> int8 x 32 (packs interleave 128-bit lanes; permute back).
  const __m256i q8 =
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 32 floats (v[0..3]) times inv, rounded to the nearest integer (ties to even) -> 32 int8
// in input order; the caller's inv keeps them within -127..127.
inline __m256i quantize32(const __m256 v[4], __m256 inv) {
  __m256 t[4];
  round32(v, inv, t);
  return pack32(t);
}

// Decode steps' activations in two int8 parts: x ~ d * (q + r / 2^kFineBits), q the
// rounding of x / d (d = max|x| / 127 over a block of 32) and r that of what q leaves,
// at a step 2^kFineBits times finer. A kernel sums q w and r w in int32 and adds them as
// (sum q w) << kFineBits + sum r w, which d / 2^kFineBits then scales: one float per
// block as before, and each activation off by at most d / 512 instead of d / 2. On
// machine AE (Intel, AMX; the 1.5B gguf in bf16, bench/eval_qa.py on 100 questions), one
// part gave the unquantized model's output on 86 of them, two parts on 96.
constexpr int kFineBits = 8;

// The residual part of 32 floats v whose first part is t (integral, from round32 at 1 / d):
// round((v - t d) * 2^kFineBits / d) -> 32 int8, clamped to -127..127 (|v - t d| <= d / 2,
// so only a tie at +-128 is clamped) for the AVX2 int8 kernel's sign trick.
inline __m256i residual32(const __m256 v[4], const __m256 t[4], __m256 d, __m256 fine_inv) {
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  __m256 r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm256_fnmadd_ps(t[i], d, v[i]);
  __m256 u[4];
  round32(r, fine_inv, u);
  for (int i = 0; i < 4; ++i) u[i] = _mm256_min_ps(_mm256_max_ps(u[i], lo), hi);
  return pack32(u);
}

// The two parts' integer sums as one: coarse << kFineBits + fine (lane by lane).
inline __m256i join_parts(__m256i coarse, __m256i fine) {
  return _mm256_add_epi32(_mm256_slli_epi32(coarse, kFineBits), fine);
}

// Bytes of weights requested ahead of the row being read. A decode step streams every
// weight once from DRAM (1.6 GB for the 1.5B model), and the hardware prefetcher alone
// left the kernel 22-26% slower than a plain read of the same bytes; 1 KiB ahead brought
// that to 11-17% (bench/quant_kernels.py, "decode_step", two runs each). The int4 kernel
// reads half the bytes a block: 512, 1024 and 2048 ahead measured 1.18x, 1.13x and 1.11x a
// plain read on a Zen 4 EPYC, within one run's noise of each other ("decode_step_int4").
constexpr int64_t kPrefetchBytes = 1024;

// Requests kLines cache lines (64 bytes each) starting kPrefetchBytes past `at`. Weight rows
// are contiguous, so near a row's end this fetches the start of the next row.
template <int kLines>
inline void prefetch_ahead(const void* at) {
  const char* ahead = static_cast<const char*>(at) + kPrefetchBytes;
  for (int c = 0; c < kLines; ++c) _mm_prefetch(ahead + 64 * c, _MM_HINT_T0);
}

// Splits output rows across intra-op threads and activation rows into tiles of up to 4.
template <typename RowsFn>
void for_tiles(int64_t M, int64_t N, const RowsFn& rows) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows(std::integral_constant<int, 4>{}, n0, n1, m);
    switch (M - m) {
      case 3: rows(std::integral_constant<int, 3>{}, n0, n1, m); break;
      case 2: rows(std::integral_constant<int, 2>{}, n0, n1, m); break;
      case 1: rows(std::integral_constant<int, 1>{}, n0, n1, m); break;
      default: break;
    }
  });
}

// Activations quantized to int8 per block of 32, in input order (qmatmul.cpp's
// quantize_input with the plain layout, or with x + 128 as unsigned bytes for the AVX-512
// kernels): xq [M, K] int8, dx [M, K/32] float32. With two parts (decode steps, see
// kFineBits), xr [M, K] holds the residual part in the same layout and dx is d / 2^8;
// otherwise xr is empty.
struct PlainActivations {
  at::Tensor xq, dx, xr;
};

// The same with each block's exact float sum, xsum [M, K/32] (empty without `sums`).
// `bf16`: the input was bfloat16, so the GEMM reading these writes its output in bfloat16.
struct BlockActivations {
  at::Tensor xq, dx, xsum, xr;
  bool bf16 = false;
};

}  // namespace ragqa::common

namespace ragqa {
// x [M, K] float32 -> its int8 activations per block of 32, stored as x + 128 (unsigned)
// when `unsigned_bytes`, in two parts when `two_parts` (defined in qmatmul.cpp).
common::PlainActivations quantize_plain(const at::Tensor& x, bool unsigned_bytes,
                                        bool two_parts);
// The same in one part, in input order, and with `sums` each block's exact float sum
// (qmatmul.cpp): the prefill GEMMs' form. x may be bfloat16 here (a bfloat16 model's
// prefill): widening it is exact, so the activations are those of x.float().
common::BlockActivations quantize_blocks(const at::Tensor& x, bool sums, bool unsigned_bytes);
// Whether decode kernels take their activations in two parts (see kFineBits): the default,
// unless a caller (a test or a benchmark) asked for one.
bool two_part_activations();
// Whether the AVX-512 VNNI kernels run (the CPU has them and no caller asked for AVX2).
bool avx512_kernels_on();
}  // namespace ragqa
