// The AVX-512 VNNI decode kernels of qmatmul.cpp (int4 and int8 weights x int8
// activations, in one part or two), called where the CPU has them (`avx512_kernels_on`).
// Included by qmatmul.cpp only, which lays out the activations (ActivationLayout) and
// splits the work into tiles.

#pragma once

#include <immintrin.h>

#include "kernel_common.h"

#include <cstdint>

namespace ragqa::decode {

using namespace ragqa::common;

// AVX-512 VNNI kernels. One vpdpbusd multiplies 64 unsigned by 64 signed bytes and sums
// each 4 into an int32, where AVX2 needs maddubs + madd for each 32: the same integers
// from a quarter of the instructions. Each output row keeps two float accumulators
// (blocks interleaved between them), so the chain of dependent fused multiply-adds is a
// quarter as long per weight as one accumulator fed a block at a time (which the AVX2
// kernels no longer do either: eight_sums). On an Intel Xeon with AVX-512 VNNI (machine
// Q), a 1.5B decode step's matmuls took 0.93x the AVX2 kernels' time in int4 (near a
// plain read of the same bytes: memory bounds it there) and 0.82-0.86x in int8
// (bench/quant_kernels.py), before the AVX2 kernels took eight_sums.
// The floats are summed in another order than the AVX2 kernels', so the same input rounds
// differently on the two paths; on each, an output is the same float whatever the tile
// size.

// The scales and minima of 16 consecutive blocks b0.. of a row with groups of `per_group`
// blocks (1, 2, 4 or 8): lane i of *s and *m holds block b0 + i's. Every load reads
// exactly the pairs of those blocks (a row's last pairs may end the tensor).
RAGQA_AVX512 inline void load_scales16(const uint16_t* smrow, int64_t b0, int per_group,
                                       __m512* s, __m512* m) {
  const uint16_t* p = smrow + 2 * (b0 / per_group);
  __m512 lo, hi;
  int shift = 0;
  if (per_group == 1) {  // 16 pairs
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  } else {
    __m256i halves;
    if (per_group == 2) {  // 8 pairs
      halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      shift = 1;
    } else if (per_group == 4) {  // 4 pairs
      halves = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      shift = 2;
    } else {  // 2 pairs
      halves = _mm256_zextsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      shift = 3;
    }
    lo = hi = _mm512_cvtph_ps(halves);
  }
  const __m512i block = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i pair = _mm512_slli_epi32(_mm512_srli_epi32(block, shift), 1);
  *s = _mm512_permutex2var_ps(lo, pair, hi);
  *m = _mm512_permutex2var_ps(lo, _mm512_add_epi32(pair, _mm512_set1_epi32(1)), hi);
}

// Lanes 0-7 from lane `a` of v, lanes 8-15 from lane `b`.
RAGQA_AVX512 inline __m512i two_lanes(int a, int b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(a)), _mm256_set1_epi32(b),
                            1);
}

RAGQA_AVX512 inline __m512 two_scales(float a, float b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1);
}

// Blocks b..b+3 of one int4 row against MT activation rows: the low nibbles of their 64
// bytes are blocks b and b+2, the high ones b+1 and b+3, and the activations hold them in
// that order (block_slot). Lanes 0-7 of scale_a[i] scale block b, lanes 8-15 block b+2;
// scale_b[i] likewise b+1 and b+3.
// With Fine, xr holds the activations' residual part: each sum becomes
// (sum over xq) << kFineBits + sum over xr.
template <int MT, bool Fine>
RAGQA_AVX512 __attribute__((always_inline)) inline void int4_four_blocks(
    const uint8_t* qrow, const int8_t* xq, const int8_t* xr, int64_t m0, int64_t K, int64_t b,
    const __m512* scale_a, const __m512* scale_b, __m512* acc_a, __m512* acc_b) {
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i bytes = _mm512_loadu_si512(qrow + b * (kBlock / 2));
  const __m512i lo = _mm512_and_si512(bytes, low_mask);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask);
  for (int i = 0; i < MT; ++i) {
    const int64_t at = (m0 + i) * K + b * kBlock;
    const int8_t* x = xq + at;
    __m512i sa = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(x));
    __m512i sb = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(x + 2 * kBlock));
    if constexpr (Fine) {
      const int8_t* r = xr + at;
      sa = _mm512_dpbusd_epi32(_mm512_slli_epi32(sa, kFineBits), lo, _mm512_loadu_si512(r));
      sb = _mm512_dpbusd_epi32(_mm512_slli_epi32(sb, kFineBits), hi,
                               _mm512_loadu_si512(r + 2 * kBlock));
    }
    acc_a[i] = _mm512_fmadd_ps(scale_a[i], _mm512_cvtepi32_ps(sa), acc_a[i]);
    acc_b[i] = _mm512_fmadd_ps(scale_b[i], _mm512_cvtepi32_ps(sb), acc_b[i]);
  }
}

// int4 weights as `dot_rows`, activations in the kInt4Avx512 layout.
template <int MT, bool Fine>
RAGQA_AVX512 void dot_rows_avx512(const uint8_t* qs, const uint16_t* sm, const int8_t* xq,
                                  const int8_t* xr, const float* dx, const float* xsum, float* y,
                                  int64_t n0, int64_t n1, int64_t m0, int64_t N, int64_t K,
                                  int64_t group) {
  const int64_t nb = K / kBlock, ng = K / group;
  const int per_group = static_cast<int>(group / kBlock);
  const bool vector_scales = per_group == 1 || per_group == 2 || per_group == 4 || per_group == 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qs + n * (K / 2);
    const uint16_t* smrow = sm + n * ng * 2;
    __m512 acc_a[MT], acc_b[MT], min_acc[MT];
    __m256 acc_pair[MT];
    float min_rest[MT];
    for (int i = 0; i < MT; ++i) {
      acc_a[i] = acc_b[i] = min_acc[i] = _mm512_setzero_ps();
      acc_pair[i] = _mm256_setzero_ps();
      min_rest[i] = 0.0f;
    }
    int64_t b = 0;
    if (vector_scales) {
      for (; b + 16 <= nb; b += 16) {
        prefetch_ahead<4>(qrow + b * (kBlock / 2));  // the 16 blocks' 256 bytes
        __m512 s16, m16, scales[MT];
        load_scales16(smrow, b, per_group, &s16, &m16);
        for (int i = 0; i < MT; ++i) {
          scales[i] = _mm512_mul_ps(s16, _mm512_loadu_ps(dx + (m0 + i) * nb + b));
          min_acc[i] =
              _mm512_fmadd_ps(m16, _mm512_loadu_ps(xsum + (m0 + i) * nb + b), min_acc[i]);
        }
        for (int j = 0; j < 16; j += 4) {
          const __m512i index_a = two_lanes(j, j + 2), index_b = two_lanes(j + 1, j + 3);
          __m512 scale_a[MT], scale_b[MT];
          for (int i = 0; i < MT; ++i) {
            scale_a[i] = _mm512_permutexvar_ps(index_a, scales[i]);
            scale_b[i] = _mm512_permutexvar_ps(index_b, scales[i]);
          }
          int4_four_blocks<MT, Fine>(qrow, xq, xr, m0, K, b + j, scale_a, scale_b, acc_a, acc_b);
        }
      }
    }
    // Scales one block at a time: groups of 4 blocks, then a last pair (K % 128 == 64),
    // which the activations hold in input order.
    auto scale_of = [&](int64_t block) { return half_to_float(smrow[2 * (block / per_group)]); };
    auto min_of = [&](int64_t block) { return half_to_float(smrow[2 * (block / per_group) + 1]); };
    for (; b + 4 <= nb; b += 4) {
      __m512 scale_a[MT], scale_b[MT];
      for (int i = 0; i < MT; ++i) {
        const float* d = dx + (m0 + i) * nb + b;
        const float* xs = xsum + (m0 + i) * nb + b;
        scale_a[i] = two_scales(scale_of(b) * d[0], scale_of(b + 2) * d[2]);
        scale_b[i] = two_scales(scale_of(b + 1) * d[1], scale_of(b + 3) * d[3]);
        min_rest[i] += min_of(b) * xs[0] + min_of(b + 1) * xs[1] + min_of(b + 2) * xs[2] +
                       min_of(b + 3) * xs[3];
      }
      int4_four_blocks<MT, Fine>(qrow, xq, xr, m0, K, b, scale_a, scale_b, acc_a, acc_b);
    }
    if (b < nb) {  // nb is even: one pair left
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + b * 16));
      const __m256i low4 = _mm256_set1_epi8(0x0F);
      const __m256i lo = _mm256_and_si256(bytes, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
      for (int i = 0; i < MT; ++i) {
        const int64_t at = (m0 + i) * K + b * kBlock;
        const float* d = dx + (m0 + i) * nb + b;
        const float* xs = xsum + (m0 + i) * nb + b;
        __m256i sa = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, load_block(xq + at));
        __m256i sb = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, load_block(xq + at + kBlock));
        if constexpr (Fine) {
          sa = _mm256_dpbusd_epi32(_mm256_slli_epi32(sa, kFineBits), lo, load_block(xr + at));
          sb = _mm256_dpbusd_epi32(_mm256_slli_epi32(sb, kFineBits), hi,
                                   load_block(xr + at + kBlock));
        }
        acc_pair[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale_of(b) * d[0]), _mm256_cvtepi32_ps(sa),
                                      acc_pair[i]);
        acc_pair[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale_of(b + 1) * d[1]),
                                      _mm256_cvtepi32_ps(sb), acc_pair[i]);
        min_rest[i] += min_of(b) * xs[0] + min_of(b + 1) * xs[1];
      }
    }
    for (int i = 0; i < MT; ++i) {
      y[(m0 + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc_a[i], acc_b[i])) +
                            hsum(acc_pair[i]) + _mm512_reduce_add_ps(min_acc[i]) + min_rest[i];
    }
  }
}

// int8 weights as `dot_rows_q8`, activations in the kInt8Avx512 layout (x + 128 as
// unsigned bytes): sum (x + 128) w - 128 sum w = sum x w, exactly, in int32.
// With Fine, xr holds the residual part (also x + 128): each part's sums start from
// -128 sum w, and the first part's are shifted by kFineBits before the second's add on.
template <int MT, bool Fine>
RAGQA_AVX512 void dot_rows_q8_avx512(const int8_t* qw, const uint16_t* dw, const int8_t* xq,
                                     const int8_t* xr, const float* dx, float* y, int64_t n0,
                                     int64_t n1, int64_t m0, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock;
  const __m512i offset = _mm512_set1_epi8(-128);  // 0x80: 128 as the unsigned operand
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = qw + n * K;
    const uint16_t* drow = dw + n * nb;
    __m512 acc_a[MT], acc_b[MT];
    __m256 acc_rest[MT];
    for (int i = 0; i < MT; ++i) {
      acc_a[i] = acc_b[i] = _mm512_setzero_ps();
      acc_rest[i] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    for (; b + 16 <= nb; b += 16) {
      prefetch_ahead<8>(wrow + b * kBlock);  // the 16 blocks' 512 bytes
      const __m512 d16 =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(drow + b)));
      __m512 scales[MT];
      for (int i = 0; i < MT; ++i) {
        scales[i] = _mm512_mul_ps(d16, _mm512_loadu_ps(dx + (m0 + i) * nb + b));
      }
      for (int j = 0; j < 16; j += 4) {  // blocks b+j, b+j+1 to acc_a; b+j+2, b+j+3 to acc_b
        const __m512i wa = _mm512_loadu_si512(wrow + (b + j) * kBlock);
        const __m512i wb = _mm512_loadu_si512(wrow + (b + j + 2) * kBlock);
        // -128 sum w per 4 bytes, the starting value of every activation row's sums
        const __m512i base_a = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, wa));
        const __m512i base_b = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, wb));
        const __m512i index_a = two_lanes(j, j + 1), index_b = two_lanes(j + 2, j + 3);
        for (int i = 0; i < MT; ++i) {
          const int64_t at = (m0 + i) * K + (b + j) * kBlock;
          const int8_t* x = xq + at;
          __m512i sa = _mm512_dpbusd_epi32(base_a, _mm512_loadu_si512(x), wa);
          __m512i sb = _mm512_dpbusd_epi32(base_b, _mm512_loadu_si512(x + 2 * kBlock), wb);
          if constexpr (Fine) {
            const int8_t* r = xr + at;
            sa = _mm512_dpbusd_epi32(_mm512_add_epi32(_mm512_slli_epi32(sa, kFineBits), base_a),
                                     _mm512_loadu_si512(r), wa);
            sb = _mm512_dpbusd_epi32(_mm512_add_epi32(_mm512_slli_epi32(sb, kFineBits), base_b),
                                     _mm512_loadu_si512(r + 2 * kBlock), wb);
          }
          acc_a[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(index_a, scales[i]),
                                     _mm512_cvtepi32_ps(sa), acc_a[i]);
          acc_b[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(index_b, scales[i]),
                                     _mm512_cvtepi32_ps(sb), acc_b[i]);
        }
      }
    }
    const __m256i offset8 = _mm256_set1_epi8(-128);
    for (; b < nb; ++b) {
      const __m256i w = load_block(wrow + b * kBlock);
      const __m256i base = _mm256_sub_epi32(
          _mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset8, w));
      const float d = half_to_float(drow[b]);
      for (int i = 0; i < MT; ++i) {
        const int64_t at = (m0 + i) * K + b * kBlock;
        __m256i s = _mm256_dpbusd_epi32(base, load_block(xq + at), w);
        if constexpr (Fine) {
          s = _mm256_dpbusd_epi32(_mm256_add_epi32(_mm256_slli_epi32(s, kFineBits), base),
                                  load_block(xr + at), w);
        }
        acc_rest[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[(m0 + i) * nb + b]),
                                      _mm256_cvtepi32_ps(s), acc_rest[i]);
      }
    }
    for (int i = 0; i < MT; ++i) {
      y[(m0 + i) * N + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc_a[i], acc_b[i])) + hsum(acc_rest[i]);
    }
  }
}

}  // namespace ragqa::decode
