// The AVX2 decode kernels of qmatmul.cpp (int4 and int8 weights x int8 activations, in one
// part or two): rows [n0, n1) of the output for a tile of MT activation rows. Included by
// qmatmul.cpp only, which quantizes the activations and splits the work into tiles.

#pragma once

#include <immintrin.h>

#include "kernel_common.h"

#include <cstdint>

namespace ragqa::decode {

using namespace ragqa::common;

// The AVX2 kernels sum 8 blocks in integers before they touch a float: each block's 8
// int32 partial sums are reduced so that lane j holds block j's whole sum (exact, so
// however the reduction is grouped the result is the same), and one float multiply-add
// then takes the 8 blocks with their 8 scales. Converting and accumulating every block on
// its own made each row one chain of dependent multiply-adds, one a block (4 cycles of
// latency per 32 weights), which bound the int4 kernel, reading only 16 bytes a block:
// 1.5-2.2x a plain read of its bytes on machine P. With weights in cache, one thread,
// machine R (Zen 3): int4 0.73x the time of the per-block version, int8 0.80x; with 4
// activation rows 0.71x and 0.76x.
// In two steps, so that a tile of rows keeps only each row's four pair sums between
// blocks: pair_sums(blocks 2p, 2p+1) for p = 0..3, then eight_sums of the four.
// hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7].
inline __m256i pair_sums(__m256i first, __m256i second) {
  return _mm256_hadd_epi32(first, second);
}

inline __m256i eight_sums(const __m256i pairs[4]) {
  // z = [blocks 0..3 over lanes 0-3 | blocks 0..3 over lanes 4-7], w likewise blocks 4..7.
  const __m256i z = _mm256_hadd_epi32(pairs[0], pairs[1]);
  const __m256i w = _mm256_hadd_epi32(pairs[2], pairs[3]);
  return _mm256_add_epi32(_mm256_permute2x128_si256(z, w, 0x20),
                          _mm256_permute2x128_si256(z, w, 0x31));
}

// One activation row's 8 blocks into its float accumulator: acc + (w_scales * dx) * sums,
// lane j for block j (w_scales: the weights' 8 block scales; dx: the row's 8).
inline __m256 add_eight_blocks(__m256 acc, __m256 w_scales, const float* dx,
                               const __m256i pairs[4]) {
  const __m256 scales = _mm256_mul_ps(w_scales, _mm256_loadu_ps(dx));
  return _mm256_fmadd_ps(scales, _mm256_cvtepi32_ps(eight_sums(pairs)), acc);
}

// Blocks 2p and 2p+1 of one int4 row against one activation row: 32 bytes -> the sums
// of q x over each block, 8 int32 partial sums apiece.
inline void q4_pair_sums(__m256i lo, __m256i hi, const int8_t* x_ptr, __m256i* first,
                         __m256i* second) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_ptr));
  const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_ptr + kBlock));
  // u8 x s8 -> pairs summed in int16 (|15 * 127 * 2| < 2^15: no saturation), then pairs
  // of int16 summed in int32.
  *first = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xa), ones);
  *second = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xb), ones);
}

// q4_pair_sums over one or two activation parts (xr: the residual part, with Fine).
template <bool Fine>
inline void q4_pair_parts(__m256i lo, __m256i hi, const int8_t* x_ptr, const int8_t* r_ptr,
                          __m256i* first, __m256i* second) {
  q4_pair_sums(lo, hi, x_ptr, first, second);
  if constexpr (Fine) {
    __m256i ra, rb;
    q4_pair_sums(lo, hi, r_ptr, &ra, &rb);
    *first = join_parts(*first, ra);
    *second = join_parts(*second, rb);
  }
}

// The scales and minima of 8 consecutive blocks from a row's [K/g, 2] fp16 pairs, for
// groups of `per_group` blocks (1, 2, 4 or 8): s and m get lane i = block b0 + i's.
inline void load_scales8(const uint16_t* smrow, int64_t b0, int per_group, __m256* s,
                         __m256* m) {
  const uint16_t* p = smrow + 2 * (b0 / per_group);
  if (per_group == 1) {  // 8 (s, m) pairs
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    // shuffle: [s0 s1 s4 s5 | s2 s3 s6 s7]; the 64-bit permute puts them in order.
    *s = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
    *m = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
    return;
  }
  // 8 / per_group pairs, at most 4: read exactly their bytes (a row's last pairs may
  // end the tensor).
  alignas(16) uint16_t pairs[8] = {0};
  for (int i = 0; i < 2 * (8 / per_group); ++i) pairs[i] = p[i];
  const __m256 v = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(pairs)));
  const int shift = per_group == 2 ? 1 : per_group == 4 ? 2 : 3;
  const __m256i block = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i pair = _mm256_slli_epi32(_mm256_srli_epi32(block, shift), 1);
  *s = _mm256_permutevar8x32_ps(v, pair);
  *m = _mm256_permutevar8x32_ps(v, _mm256_add_epi32(pair, _mm256_set1_epi32(1)));
}

// int4 weights: rows [n0, n1) for activation rows [m0, m0 + MT). Each row of each tile
// keeps its own accumulators and adds its blocks in order, so an output is the same float
// whatever the tile size. Blocks come 8 at a time (eight_sums) with their scales converted
// together; a group size whose blocks do not come in those sizes (or K's last blocks short
// of 8) takes them one pair at a time.
// With Fine, xr holds the activations' residual part (kFineBits).
template <int MT, bool Fine>
void dot_rows(const uint8_t* qs, const uint16_t* sm, const int8_t* xq, const int8_t* xr,
              const float* dx, const float* xsum, float* y, int64_t n0, int64_t n1, int64_t m0,
              int64_t N, int64_t K, int64_t group) {
  const int64_t nb = K / kBlock, ng = K / group;
  const int per_group = static_cast<int>(group / kBlock);
  const bool vector_scales = per_group == 1 || per_group == 2 || per_group == 4 || per_group == 8;
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qs + n * (K / 2);
    const uint16_t* smrow = sm + n * ng * 2;
    __m256 acc[MT], min_acc[MT];
    for (int i = 0; i < MT; ++i) {
      acc[i] = _mm256_setzero_ps();
      min_acc[i] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    if (vector_scales) {
      for (; b + 8 <= nb; b += 8) {
        prefetch_ahead<2>(qrow + b * (kBlock / 2));  // the 8 blocks' 128 bytes
        __m256 s8, m8;
        load_scales8(smrow, b, per_group, &s8, &m8);
        __m256i pairs[MT][4];
        for (int j = 0; j < 4; ++j) {
          const __m256i bytes =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + (b + 2 * j) * (kBlock / 2)));
          const __m256i lo = _mm256_and_si256(bytes, low_mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
          for (int i = 0; i < MT; ++i) {
            __m256i sa, sb;
            const int64_t at = (m0 + i) * K + (b + 2 * j) * kBlock;
            q4_pair_parts<Fine>(lo, hi, xq + at, xr + at, &sa, &sb);
            pairs[i][j] = pair_sums(sa, sb);
          }
        }
        for (int i = 0; i < MT; ++i) {
          acc[i] = add_eight_blocks(acc[i], s8, dx + (m0 + i) * nb + b, pairs[i]);
          min_acc[i] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xsum + (m0 + i) * nb + b), min_acc[i]);
        }
      }
    }
    for (; b < nb; b += 2) {  // nb is even: K is a multiple of 64
      const __m256i bytes =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + b * (kBlock / 2)));
      const __m256i lo = _mm256_and_si256(bytes, low_mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
      const int64_t ga = b / per_group, gb = (b + 1) / per_group;
      const float sa_w = half_to_float(smrow[2 * ga]), ma = half_to_float(smrow[2 * ga + 1]);
      const float sb_w = half_to_float(smrow[2 * gb]), mb = half_to_float(smrow[2 * gb + 1]);
      for (int i = 0; i < MT; ++i) {
        __m256i sa, sb;
        const int64_t at = (m0 + i) * K + b * kBlock;
        q4_pair_parts<Fine>(lo, hi, xq + at, xr + at, &sa, &sb);
        const float* d = dx + (m0 + i) * nb + b;
        const float* xs = xsum + (m0 + i) * nb + b;
        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(sa_w * d[0]), _mm256_cvtepi32_ps(sa), acc[i]);
        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(sb_w * d[1]), _mm256_cvtepi32_ps(sb), acc[i]);
        // lane 0 of the minimum accumulator: the same sum, in a fixed lane
        min_acc[i] = _mm256_add_ps(
            min_acc[i], _mm256_setr_ps(ma * xs[0] + mb * xs[1], 0, 0, 0, 0, 0, 0, 0));
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = hsum(acc[i]) + hsum(min_acc[i]);
  }
}

// One block's products summed into 8 int32 lanes: sum_j w_j x_j over 32 int8 pairs.
inline __m256i q8_block_sums(__m256i w, __m256i w_abs, const int8_t* x_ptr) {
  const __m256i xv = load_block(x_ptr);
  // maddubs wants one unsigned operand: |w| times x with w's sign (|127 * 127 * 2| < 2^15).
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xv, w)),
                           _mm256_set1_epi16(1));
}

// q8_block_sums over one or two activation parts (r_ptr: the residual part, with Fine).
template <bool Fine>
inline __m256i q8_block_parts(__m256i w, __m256i w_abs, const int8_t* x_ptr, const int8_t* r_ptr) {
  const __m256i sums = q8_block_sums(w, w_abs, x_ptr);
  if constexpr (Fine) return join_parts(sums, q8_block_sums(w, w_abs, r_ptr));
  return sums;
}

// int8 weights: rows [n0, n1) for activation rows [m0, m0 + MT). Blocks come 8 at a time
// (eight_sums) with their scales converted together; every row keeps one accumulator and
// adds its blocks in order, so each output is the same float whatever the tile size (a
// request decodes the same tokens alone or in a batch).
// With Fine, xr holds the activations' residual part (kFineBits).
template <int MT, bool Fine>
void dot_rows_q8(const int8_t* qw, const uint16_t* dw, const int8_t* xq, const int8_t* xr,
                 const float* dx, float* y, int64_t n0, int64_t n1, int64_t m0, int64_t N,
                 int64_t K) {
  const int64_t nb = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = qw + n * K;
    const uint16_t* drow = dw + n * nb;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
      prefetch_ahead<4>(wrow + b * kBlock);  // the 8 blocks' 256 bytes
      const __m256 d8 =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(drow + b)));
      __m256i pairs[MT][4];
      for (int j = 0; j < 4; ++j) {
        const __m256i wa = load_block(wrow + (b + 2 * j) * kBlock);
        const __m256i wb = load_block(wrow + (b + 2 * j + 1) * kBlock);
        const __m256i wa_abs = _mm256_sign_epi8(wa, wa), wb_abs = _mm256_sign_epi8(wb, wb);
        for (int i = 0; i < MT; ++i) {
          const int64_t at = (m0 + i) * K + (b + 2 * j) * kBlock;
          pairs[i][j] = pair_sums(q8_block_parts<Fine>(wa, wa_abs, xq + at, xr + at),
                                  q8_block_parts<Fine>(wb, wb_abs, xq + at + kBlock,
                                                       xr + at + kBlock));
        }
      }
      for (int i = 0; i < MT; ++i) {
        acc[i] = add_eight_blocks(acc[i], d8, dx + (m0 + i) * nb + b, pairs[i]);
      }
    }
    for (; b < nb; ++b) {
      const __m256i w = load_block(wrow + b * kBlock);
      const __m256i w_abs = _mm256_sign_epi8(w, w);
      const float d = half_to_float(drow[b]);
      for (int i = 0; i < MT; ++i) {
        const int64_t at = (m0 + i) * K + b * kBlock;
        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[(m0 + i) * nb + b]),
                                 _mm256_cvtepi32_ps(q8_block_parts<Fine>(w, w_abs, xq + at, xr + at)),
                                 acc[i]);
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = hsum(acc[i]);
  }
}

}  // namespace ragqa::decode
