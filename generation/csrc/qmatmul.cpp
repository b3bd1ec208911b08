// int4- and int8-weight x int8-activation matrix products for CPU decode steps (AVX2, and
// AVX-512 VNNI where the CPU has it).
//
// torch's weight-only int4 kernel converts every weight to float before multiplying; on a
// 2-core CPU that makes a decode step compute-bound at about half of llama.cpp's speed.
// Here, as in llama.cpp's Q4 x Q8 dot products, the activations are quantized to int8 per
// block of 32 and the products are summed in integers (maddubs + madd), so one 256-bit
// instruction pair does 32 multiply-adds; floats appear once per 8 blocks of 32.
//
// Weight layout, per output row n:
//   qs [N, K/2] uint8: each 64 inputs are 32 bytes; byte j holds input 64c+j in its low
//                      nibble and input 64c+32+j in its high nibble (values 0..15), the
//                      order of llama.cpp's Q4_K, so a GGUF's Q4_K bytes are taken as they
//                      are (generation/gguf_packs.py) and one 256-bit load feeds two blocks
//   sm [N, K/g, 2] fp16: per group of g inputs, scale s and minimum m: w = q * s + m
// so  y[n] = sum_b ( s_b * sum_{k in b} q_k x_k  +  m_b * sum_{k in b} x_k )  over blocks b
// of 32 (s_b, m_b: those of b's group). The first sum uses the int8 activations, the
// second the exact float activations.
// int8 weights (q8_linear) are symmetric per block of 32 inputs, as llama.cpp's Q8_0:
// w = q * d_{n,b}, q in [-127, 127], d fp16 [N, K/32]. A scale per output row instead
// lets one large weight coarsen its whole row: on the 1.5B model, under teacher forcing
// over 1,200 positions, per-row scales changed the top token at 2.25% of positions and
// per-block scales at 1.5% (mean KL to the float model 0.0026 vs 0.0009).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace ragqa::common;

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

// Which matmul kernels run: the AVX-512 VNNI ones where the CPU has them, unless a caller
// (a test or a benchmark comparing the two) asked for AVX2.
std::atomic<bool>& avx512_wanted() {
  static std::atomic<bool> wanted{cpu_has_avx512_vnni()};
  return wanted;
}

inline bool avx512_on() { return avx512_wanted().load(std::memory_order_relaxed); }

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// How a kernel wants the int8 activations laid out.
enum class ActivationLayout {
  kPlain,  // blocks in input order, signed (the AVX2 kernels)
  // The AVX-512 int4 kernel: in each whole group of 4 blocks, blocks 0, 2, 1, 3, so that
  // one 64-byte load of activations meets one 64-byte load of nibbles (whose low nibbles
  // hold blocks 0 and 2 of the group, the high ones blocks 1 and 3); signed.
  kInt4Avx512,
  // The AVX-512 int8 kernel: blocks in input order, stored as x + 128 (unsigned), because
  // VNNI multiplies unsigned by signed bytes and the weights are the signed operand.
  kInt8Avx512,
};

// Where block b of a row goes in the activations' layout.
inline int64_t block_slot(int64_t b, int64_t nb, ActivationLayout layout) {
  if (layout != ActivationLayout::kInt4Avx512 || b >= nb / 4 * 4) return b;
  static constexpr int64_t kSwap[4] = {0, 2, 1, 3};
  return (b & ~int64_t{3}) | kSwap[b & 3];
}

// x [M, K] float -> xq [M, K] int8 (in `layout`), dx [M, K/32] (xq * dx ~ x), and with
// `sums` the exact sums of each block of 32, xsum [M, K/32] (int8 weights have no minimum
// term to feed). dx and xsum are in input order whatever the layout.
void quantize_activations(const float* x, int64_t M, int64_t K, bool sums,
                          ActivationLayout layout, int8_t* xq, float* dx, float* xsum) {
  const int64_t nb = K / kBlock;
  const __m256i offset = _mm256_set1_epi8(layout == ActivationLayout::kInt8Avx512 ? -128 : 0);
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
      if (sums) {
        xsum[m * nb + b] =
            hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
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
      // x + 128 as a byte: flipping the top bit maps -127..127 to 1..255
      q8 = _mm256_xor_si256(q8, offset);
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(xq + m * K + block_slot(b, nb, layout) * kBlock), q8);
    }
  }
}

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
template <int MT>
void dot_rows(const uint8_t* qs, const uint16_t* sm, const int8_t* xq, const float* dx,
              const float* xsum, float* y, int64_t n0, int64_t n1, int64_t m0, int64_t N,
              int64_t K, int64_t group) {
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
        for (int c = 0; c < 2; ++c) {  // the 8 blocks' 128 bytes, kPrefetchBytes ahead
          _mm_prefetch(
              reinterpret_cast<const char*>(qrow + b * (kBlock / 2) + kPrefetchBytes + 64 * c),
              _MM_HINT_T0);
        }
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
            q4_pair_sums(lo, hi, xq + (m0 + i) * K + (b + 2 * j) * kBlock, &sa, &sb);
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
        q4_pair_sums(lo, hi, xq + (m0 + i) * K + b * kBlock, &sa, &sb);
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

inline __m256i load_block(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// One block's products summed into 8 int32 lanes: sum_j w_j x_j over 32 int8 pairs.
inline __m256i q8_block_sums(__m256i w, __m256i w_abs, const int8_t* x_ptr) {
  const __m256i xv = load_block(x_ptr);
  // maddubs wants one unsigned operand: |w| times x with w's sign (|127 * 127 * 2| < 2^15).
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xv, w)),
                           _mm256_set1_epi16(1));
}

// One block's contribution: acc += scale * sum_j w_j x_j (a row's last blocks short of 8).
inline __m256 q8_block(__m256i w, __m256i w_abs, const int8_t* x_ptr, __m256 scale, __m256 acc) {
  return _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(q8_block_sums(w, w_abs, x_ptr)), acc);
}

// int8 weights: rows [n0, n1) for activation rows [m0, m0 + MT). Blocks come 8 at a time
// (eight_sums) with their scales converted together; every row keeps one accumulator and
// adds its blocks in order, so each output is the same float whatever the tile size (a
// request decodes the same tokens alone or in a batch).
template <int MT>
void dot_rows_q8(const int8_t* qw, const uint16_t* dw, const int8_t* xq, const float* dx,
                 float* y, int64_t n0, int64_t n1, int64_t m0, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = qw + n * K;
    const uint16_t* drow = dw + n * nb;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
      // Rows are contiguous, so near a row's end this fetches the start of the next.
      for (int c = 0; c < 4; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(wrow + b * kBlock + kPrefetchBytes + 64 * c),
                     _MM_HINT_T0);
      }
      const __m256 d8 =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(drow + b)));
      __m256i pairs[MT][4];
      for (int j = 0; j < 4; ++j) {
        const __m256i wa = load_block(wrow + (b + 2 * j) * kBlock);
        const __m256i wb = load_block(wrow + (b + 2 * j + 1) * kBlock);
        const __m256i wa_abs = _mm256_sign_epi8(wa, wa), wb_abs = _mm256_sign_epi8(wb, wb);
        for (int i = 0; i < MT; ++i) {
          const int8_t* x_ptr = xq + (m0 + i) * K + (b + 2 * j) * kBlock;
          pairs[i][j] = pair_sums(q8_block_sums(wa, wa_abs, x_ptr),
                                  q8_block_sums(wb, wb_abs, x_ptr + kBlock));
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
        acc[i] = q8_block(w, w_abs, xq + (m0 + i) * K + b * kBlock,
                          _mm256_set1_ps(d * dx[(m0 + i) * nb + b]), acc[i]);
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = hsum(acc[i]);
  }
}

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
template <int MT>
RAGQA_AVX512 __attribute__((always_inline)) inline void int4_four_blocks(
    const uint8_t* qrow, const int8_t* xq, int64_t m0, int64_t K, int64_t b,
    const __m512* scale_a, const __m512* scale_b, __m512* acc_a, __m512* acc_b) {
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i bytes = _mm512_loadu_si512(qrow + b * (kBlock / 2));
  const __m512i lo = _mm512_and_si512(bytes, low_mask);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask);
  for (int i = 0; i < MT; ++i) {
    const int8_t* x = xq + (m0 + i) * K + b * kBlock;
    const __m512i sa = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(x));
    const __m512i sb = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(x + 2 * kBlock));
    acc_a[i] = _mm512_fmadd_ps(scale_a[i], _mm512_cvtepi32_ps(sa), acc_a[i]);
    acc_b[i] = _mm512_fmadd_ps(scale_b[i], _mm512_cvtepi32_ps(sb), acc_b[i]);
  }
}

// int4 weights as `dot_rows`, activations in the kInt4Avx512 layout.
template <int MT>
RAGQA_AVX512 void dot_rows_avx512(const uint8_t* qs, const uint16_t* sm, const int8_t* xq,
                                  const float* dx, const float* xsum, float* y, int64_t n0,
                                  int64_t n1, int64_t m0, int64_t N, int64_t K, int64_t group) {
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
        for (int c = 0; c < 4; ++c) {  // the 16 blocks' 256 bytes, kPrefetchBytes ahead
          _mm_prefetch(
              reinterpret_cast<const char*>(qrow + b * (kBlock / 2) + kPrefetchBytes + 64 * c),
              _MM_HINT_T0);
        }
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
          int4_four_blocks<MT>(qrow, xq, m0, K, b + j, scale_a, scale_b, acc_a, acc_b);
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
      int4_four_blocks<MT>(qrow, xq, m0, K, b, scale_a, scale_b, acc_a, acc_b);
    }
    if (b < nb) {  // nb is even: one pair left
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + b * 16));
      const __m256i low4 = _mm256_set1_epi8(0x0F);
      const __m256i lo = _mm256_and_si256(bytes, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
      for (int i = 0; i < MT; ++i) {
        const int8_t* x = xq + (m0 + i) * K + b * kBlock;
        const float* d = dx + (m0 + i) * nb + b;
        const float* xs = xsum + (m0 + i) * nb + b;
        const __m256i sa = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo,
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
        const __m256i sb = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(), hi,
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + kBlock)));
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
template <int MT>
RAGQA_AVX512 void dot_rows_q8_avx512(const int8_t* qw, const uint16_t* dw, const int8_t* xq,
                                     const float* dx, float* y, int64_t n0, int64_t n1,
                                     int64_t m0, int64_t N, int64_t K) {
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
      for (int c = 0; c < 8; ++c) {  // Rows are contiguous: near a row's end, the next row.
        _mm_prefetch(reinterpret_cast<const char*>(wrow + b * kBlock + kPrefetchBytes + 64 * c),
                     _MM_HINT_T0);
      }
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
          const int8_t* x = xq + (m0 + i) * K + (b + j) * kBlock;
          const __m512i sa = _mm512_dpbusd_epi32(base_a, _mm512_loadu_si512(x), wa);
          const __m512i sb = _mm512_dpbusd_epi32(base_b, _mm512_loadu_si512(x + 2 * kBlock), wb);
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
        const __m256i s = _mm256_dpbusd_epi32(base, load_block(xq + (m0 + i) * K + b * kBlock), w);
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

// ---- int4 / int5 x int8 GEMM for long prefills (AVX2) ----
//
// The decode kernels above walk one weight row at a time and convert, scale and add every
// 8 blocks per activation row; for hundreds of rows an fp32 GEMM on float copies of the
// weights beat them. On an AVX2 CPU without AVX-512 that fp32 GEMM was the whole prefill
// (TTFT ~1.1x llama.cpp's on the 1.5B). Integer products can go faster than fp32 there
// only if few instructions are spent per maddubs: with 4-bit weights (0..15) and int8
// activations (|x| <= 127), one maddubs lane holds at most 2 * 15 * 127 = 3810, so the
// 8 maddubs of a block of 32 inputs sum exactly in int16 (8 * 3810 < 2^15) before one
// madd widens them and one multiply-add scales them: about 3 instructions per maddubs
// where llama.cpp's form (sign, maddubs, madd, convert, multiply-add) takes 5.
//
// Layout: an output column's 4 consecutive inputs sit in one int32 lane, 8 output
// columns side by side (a "panel": [K/4][8][4] bytes, one value 0..15 a byte), so one
// 4-byte broadcast of an activation row's quad meets 8 columns at once. Panels are laid
// out from the decode packs (qs [N, K/2]) per call into a thread's own buffer, and each
// is then read by every activation row: the packs stay the only copy of the weights.
// Activations are int8 per block of 32 as in the decode kernels, with the blocks' exact
// float sums for the minimum term, so y[m, n] = sum_b dx[m,b] s[n,b] sum_{k in b} q x
// + m[n,b] xsum[m,b].
// int8 packs whose values lie in -16..15 (a GGUF's Q5_0 blocks: most of the 0.5B model)
// go the same way as q + 16 (0..31): a maddubs lane then holds up to 2 * 31 * 127 = 7874,
// so 4 maddubs (half a block) sum in int16, and the offset comes off as a per-row term,
// y[m, n] = sum_b d[n,b] (dx[m,b] sum_{k in b} (q + 16) x  -  16 dx[m,b] sum_{k in b} x):
// the same form, with s = m = d and xsum = -16 dx sum(x) over the int8 activations.
// 6-bit packs (a GGUF's Q6_K blocks: q in -32..31, an int8 scale c per 16 inputs and a
// float16 d per 256, w = q c d) take the other operand order: activations stored as
// x + 128 (1..255, unsigned) times the signed weights, a maddubs lane at most 2 * 255 *
// 32 = 16320, so 2 maddubs sum in int16; madd then multiplies those sums by c (in place
// of 1) and the offset comes off per column, not per row: sum (x + 128) q c = sum x q c +
// 128 sum q c, the last a constant of the panel, which starts each block's int32 sum.
// y[m, n] = sum_b d[n,b] dx[m,b] sum_{k in b} x q c: one float multiply-add a block.
constexpr int64_t kPanel = 8;    // output columns of a panel: one int32 lane each
constexpr int kGemmRows = 2;     // activation rows of a register tile
constexpr int kGemmPanels = 2;   // panels of a register tile
// 2 x 2 keeps 4 int16 sums (and for 5-bit panels 4 int32 block sums), 4 float
// accumulators, 2 broadcasts and a weight vector in registers. In a throwaway C++ copy of
// this loop on machine S (Zen 3), 624 x 1536 rows by 8960 columns, one run each while an
// install ran beside it, 3 x 2 ran as fast with two threads and 0.96x as fast with one;
// 2 x 3 0.82-0.92x; 4 x 1 and 1 x 4 0.47-0.65x. On machine T, 3 x 2 was no faster either.

// A panel's 8 columns' 4-input quads, 8 quads per vector (column l's quad j in vector l),
// transposed so that vector j holds quad j of every column.
inline void transpose8x8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// Columns [n0, n0 + 8) of int4 packs -> one panel: wp [K/4][8][4] values 0..15, s and mn
// [K/32][8] float (each block's scale and minimum). Columns at or past N are zero.
void layout_panel_q4(const uint8_t* qs, const uint16_t* sm, int64_t n0, int64_t N, int64_t K,
                     int64_t group, uint8_t* wp, float* s, float* mn) {
  const int64_t ng = K / group, per_group = group / kBlock;
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  for (int64_t c = 0; c < K / (2 * kBlock); ++c) {  // 64 inputs: 32 bytes of each column
    __m256i lo[kPanel], hi[kPanel];
    for (int64_t l = 0; l < kPanel; ++l) {
      if (n0 + l >= N) {
        lo[l] = hi[l] = _mm256_setzero_si256();
        continue;
      }
      const __m256i bytes = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(qs + (n0 + l) * (K / 2) + c * kBlock));
      lo[l] = _mm256_and_si256(bytes, low_mask);  // inputs 64c .. 64c+31
      hi[l] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);  // 64c+32 .. 64c+63
    }
    transpose8x8(lo);
    transpose8x8(hi);
    uint8_t* out = wp + c * 16 * 32;  // 16 quads of 8 columns x 4 bytes
    for (int j = 0; j < 8; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * 32), lo[j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (8 + j) * 32), hi[j]);
    }
  }
  for (int64_t b = 0; b < K / kBlock; ++b) {
    for (int64_t l = 0; l < kPanel; ++l) {
      const bool real = n0 + l < N;
      const uint16_t* pair = sm + ((n0 + l) * ng + b / per_group) * 2;
      s[b * kPanel + l] = real ? half_to_float(pair[0]) : 0.0f;
      mn[b * kPanel + l] = real ? half_to_float(pair[1]) : 0.0f;
    }
  }
}

// Columns [n0, n0 + 8) of int8 packs with values in -16..15 -> one panel: wp [K/4][8][4]
// values q + 16 (0..31), s = mn = [K/32][8] block scales. Columns at or past N are zero.
// Returns false if a value lies outside -16..15 (the panel is then unusable).
bool layout_panel_q5(const int8_t* qw, const uint16_t* dw, int64_t n0, int64_t N, int64_t K,
                     uint8_t* wp, float* s, float* mn) {
  const int64_t nb = K / kBlock;
  const __m256i offset = _mm256_set1_epi8(16);
  __m256i largest = _mm256_setzero_si256();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v[kPanel];
    for (int64_t l = 0; l < kPanel; ++l) {
      if (n0 + l >= N) {
        v[l] = _mm256_setzero_si256();
        continue;
      }
      v[l] = _mm256_add_epi8(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + (n0 + l) * K + b * kBlock)),
          offset);
      largest = _mm256_max_epu8(largest, v[l]);  // -16..15 + 16 -> 0..31 as unsigned bytes
    }
    transpose8x8(v);
    for (int j = 0; j < 8; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wp + (b * 8 + j) * 32), v[j]);
    }
    for (int64_t l = 0; l < kPanel; ++l) {
      const float d = n0 + l < N ? half_to_float(dw[(n0 + l) * nb + b]) : 0.0f;
      s[b * kPanel + l] = mn[b * kPanel + l] = d;
    }
  }
  return _mm256_testz_si256(largest, _mm256_set1_epi8(static_cast<char>(0xE0)));
}

// Columns [n0, n0 + 8) of 6-bit packs -> one panel: wp [K/4][8][4] values q (-32..31, as
// signed bytes), s [K/32][8] each block's d, sub [K/16][8] each 16 inputs' c twice over
// (two int16 lanes: madd's multiplier for a column's lane), base [K/32][8] each block's
// -128 sum q c. Columns at or past N are zero. Returns false if a value lies outside
// -32..31 (the panel is then unusable).
bool layout_panel_q6(const int8_t* qw, const int8_t* sc, const uint16_t* d, int64_t n0,
                     int64_t N, int64_t K, uint8_t* wp, float* s, int32_t* sub, int32_t* base) {
  const int64_t nb = K / kBlock, ns = K / 16, nd = K / 256;
  const __m256i offset = _mm256_set1_epi8(32);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i largest = _mm256_setzero_si256();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v[kPanel];
    for (int64_t l = 0; l < kPanel; ++l) {
      v[l] = n0 + l < N ? _mm256_loadu_si256(
                              reinterpret_cast<const __m256i*>(qw + (n0 + l) * K + b * kBlock))
                        : _mm256_setzero_si256();
      // -32..31 + 32 -> 0..63 as unsigned bytes
      largest = _mm256_max_epu8(largest, _mm256_add_epi8(v[l], offset));
    }
    transpose8x8(v);
    __m256i half_sums[2];  // int32 per column: sum q over each 16 inputs of the block
    for (int h = 0; h < 2; ++h) {
      half_sums[h] = _mm256_setzero_si256();
      for (int j = 4 * h; j < 4 * h + 4; ++j) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wp + (b * 8 + j) * 32), v[j]);
        half_sums[h] = _mm256_add_epi32(
            half_sums[h], _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v[j]), ones16));
      }
    }
    alignas(32) int32_t c[2][kPanel];
    for (int64_t l = 0; l < kPanel; ++l) {
      const bool real = n0 + l < N;
      for (int h = 0; h < 2; ++h) {
        c[h][l] = real ? sc[(n0 + l) * ns + 2 * b + h] : 0;
        sub[(2 * b + h) * kPanel + l] = static_cast<int32_t>(
            (static_cast<uint32_t>(static_cast<uint16_t>(c[h][l])) << 16) |
            static_cast<uint16_t>(c[h][l]));
      }
      s[b * kPanel + l] = real ? half_to_float(d[(n0 + l) * nd + b / 8]) : 0.0f;
    }
    const __m256i total = _mm256_add_epi32(
        _mm256_mullo_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[0])), half_sums[0]),
        _mm256_mullo_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[1])), half_sums[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(base + b * kPanel),
                        _mm256_mullo_epi32(total, _mm256_set1_epi32(-128)));
  }
  return _mm256_testz_si256(largest, _mm256_set1_epi8(static_cast<char>(0xC0)));
}

// R x P float accumulators -> y columns [n0, n0 + 8P), those < N, of rows [m0, m0 + R).
template <int R, int P>
void store_tile(const __m256 acc[R][P], float* y, int64_t m0, int64_t n0, int64_t N) {
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) {
      const int64_t n = n0 + p * kPanel;
      float* out = y + (m0 + r) * N + n;
      if (n + kPanel <= N) {
        _mm256_storeu_ps(out, acc[r][p]);
      } else if (n < N) {
        alignas(32) float tail[kPanel];
        _mm256_store_ps(tail, acc[r][p]);
        std::memcpy(out, tail, (N - n) * sizeof(float));
      }
    }
  }
}

// Activation rows [m0, m0 + R) times P consecutive panels (wp, s, mn: the first; the next
// follow at K * 8 bytes and K / 32 * 8 floats) into y columns [n0, n0 + 8P), those < N.
// Q quads (4 inputs each) are summed in int16 before each widening: 8 for int4 panels, 4
// for int5 ones (see above).
template <int R, int P, int Q>
void gemm_tile(const uint8_t* wp, const float* s, const float* mn, const int8_t* xq,
               const float* dx, const float* xsum, float* y, int64_t m0, int64_t n0, int64_t N,
               int64_t K) {
  const int64_t nb = K / kBlock, panel_bytes = K * kPanel, panel_scales = nb * kPanel;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
  static_assert(Q == 4 || Q == 8, "a block is 8 quads");
  for (int64_t b = 0; b < nb; ++b) {
    __m256i block[R][P];  // int32: the block's sums, exact
    for (int64_t first = b * 8; first < b * 8 + 8; first += Q) {
      __m256i sums[R][P];  // int16, exact (see above)
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) sums[r][p] = _mm256_setzero_si256();
      // Unrolled, gcc regroups the 8 additions into a tree of 32 live maddubs results and
      // spills them; one quad per iteration keeps every sum in a register (1.7x faster).
#pragma GCC unroll 1
      for (int64_t q = first; q < first + Q; ++q) {
        __m256i xb[R];
        for (int r = 0; r < R; ++r) {
          int32_t quad;
          std::memcpy(&quad, xq + (m0 + r) * K + q * 4, sizeof quad);
          xb[r] = _mm256_set1_epi32(quad);
        }
        for (int p = 0; p < P; ++p) {
          const __m256i w =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + p * panel_bytes + q * 32));
          for (int r = 0; r < R; ++r) {
            sums[r][p] = _mm256_add_epi16(sums[r][p], _mm256_maddubs_epi16(w, xb[r]));
            asm volatile("" : "+x"(sums[r][p]));  // keeps the chain in order (see above)
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int p = 0; p < P; ++p) {
          const __m256i wide = _mm256_madd_epi16(sums[r][p], ones);
          block[r][p] = Q == 8 || first == b * 8 ? wide : _mm256_add_epi32(block[r][p], wide);
        }
      }
    }
    // Floats once a block: its scale times its sums, and its per-row term.
    for (int p = 0; p < P; ++p) {
      const __m256 sv = _mm256_loadu_ps(s + p * panel_scales + b * kPanel);
      const __m256 mv = _mm256_loadu_ps(mn + p * panel_scales + b * kPanel);
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_mul_ps(sv, _mm256_broadcast_ss(dx + (m0 + r) * nb + b));
        acc[r][p] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(block[r][p]), acc[r][p]);
        acc[r][p] =
            _mm256_fmadd_ps(mv, _mm256_broadcast_ss(xsum + (m0 + r) * nb + b), acc[r][p]);
      }
    }
  }
  store_tile<R, P>(acc, y, m0, n0, N);
}

// Activation rows [m0, m0 + R) (xq: x + 128 as unsigned bytes) times P consecutive 6-bit
// panels (wp, s, sub, base: the first; the next follow at K * 8 bytes, K / 32 * 8 floats,
// K / 16 * 8 and K / 32 * 8 int32) into y columns [n0, n0 + 8P), those < N.
template <int R, int P>
void gemm_tile_q6(const uint8_t* wp, const float* s, const int32_t* sub, const int32_t* base,
                  const uint8_t* xq, const float* dx, float* y, int64_t m0, int64_t n0,
                  int64_t N, int64_t K) {
  const int64_t nb = K / kBlock, panel_bytes = K * kPanel, panel_blocks = nb * kPanel,
                panel_subs = K / 16 * kPanel;
  __m256 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i block[R][P];  // int32: the block's sums of (x + 128) q c, exact
    for (int p = 0; p < P; ++p) {
      const __m256i start =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + p * panel_blocks + b * kPanel));
      for (int r = 0; r < R; ++r) block[r][p] = start;
    }
    // Each 16 inputs (h) of the block: their c, then two int16 sums of 2 quads each.
#pragma GCC unroll 1
    for (int64_t h = 0; h < 2; ++h) {
      __m256i c[P];
      for (int p = 0; p < P; ++p) {
        c[p] = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(sub + p * panel_subs + (2 * b + h) * kPanel));
      }
      for (int64_t q = b * 8 + 4 * h; q < b * 8 + 4 * h + 4; q += 2) {
        __m256i xa[R], xb[R];
        for (int r = 0; r < R; ++r) {
          int32_t quad;  // 4-byte copies: each a broadcast from memory
          std::memcpy(&quad, xq + (m0 + r) * K + q * 4, sizeof quad);
          xa[r] = _mm256_set1_epi32(quad);
          std::memcpy(&quad, xq + (m0 + r) * K + q * 4 + 4, sizeof quad);
          xb[r] = _mm256_set1_epi32(quad);
        }
        for (int p = 0; p < P; ++p) {
          const uint8_t* w = wp + p * panel_bytes + q * 32;
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
          for (int r = 0; r < R; ++r) {
            const __m256i sum = _mm256_add_epi16(_mm256_maddubs_epi16(xa[r], w0),
                                                 _mm256_maddubs_epi16(xb[r], w1));
            block[r][p] = _mm256_add_epi32(block[r][p], _mm256_madd_epi16(sum, c[p]));
          }
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      const __m256 sv = _mm256_loadu_ps(s + p * panel_blocks + b * kPanel);
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_mul_ps(sv, _mm256_broadcast_ss(dx + (m0 + r) * nb + b));
        acc[r][p] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(block[r][p]), acc[r][p]);
      }
    }
  }
  store_tile<R, P>(acc, y, m0, n0, N);
}

// The activations of one call, quantized once and read by every output row.
struct QuantizedInput {
  at::Tensor xq, dx, xsum;
};

QuantizedInput quantize_input(const at::Tensor& x, bool sums, ActivationLayout layout) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
  const at::Tensor xc = x.contiguous();
  const int64_t nb = K / kBlock;
  QuantizedInput in{at::empty({M, K}, x.options().dtype(at::kChar)),
                    at::empty({M, nb}, x.options()), at::empty({M, sums ? nb : 0}, x.options())};
  const float* xp = xc.data_ptr<float>();
  int8_t* xqp = in.xq.data_ptr<int8_t>();
  float* dxp = in.dx.data_ptr<float>();
  float* xsp = in.xsum.data_ptr<float>();
  // Rows in parallel for a prefill's hundreds; a decode step's few (at most 16) stay on
  // the calling thread.
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    quantize_activations(xp + m0 * K, m1 - m0, K, sums, layout, xqp + m0 * K, dxp + m0 * nb,
                         sums ? xsp + m0 * nb : xsp);
  });
  return in;
}

// x [M, K] float32 -> its int8 activations per block of 32 (in input order), their scales
// dx [M, K/32], and the per-row term of each block (xsum [M, K/32]): the exact float sums
// for int4 panels, -16 dx sum(xq) for int5 ones.
QuantizedInput quantize_gemm_input(const at::Tensor& x, bool int5) {
  QuantizedInput in = quantize_input(x, !int5, ActivationLayout::kPlain);
  if (!int5) return in;
  const int64_t M = in.dx.size(0), nb = in.dx.size(1);
  in.xsum = at::empty({M, nb}, in.dx.options());
  const int8_t* xqp = in.xq.data_ptr<int8_t>();
  const float* dxp = in.dx.data_ptr<float>();
  float* xsp = in.xsum.data_ptr<float>();
  at::parallel_for(0, M * nb, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int32_t total = 0;
      for (int64_t k = 0; k < kBlock; ++k) total += xqp[i * kBlock + k];
      xsp[i] = -16.0f * dxp[i] * static_cast<float>(total);
    }
  });
  return in;
}

// One thread's kGemmPanels panels: each buffer holds them one after another (the layouts
// above say what a panel's part holds).
struct Panels {
  Panels(int64_t k, bool six_bit)
      : K(k),
        wp(kGemmPanels * k * kPanel),
        s(kGemmPanels * k / kBlock * kPanel),
        mn(six_bit ? 0 : s.size()),
        sub(six_bit ? kGemmPanels * k / 16 * kPanel : 0),
        base(six_bit ? s.size() : 0) {}
  uint8_t* weights(int64_t p) { return wp.data() + p * K * kPanel; }
  float* scales(int64_t p) { return s.data() + p * K / kBlock * kPanel; }
  float* minima(int64_t p) { return mn.data() + p * K / kBlock * kPanel; }
  int32_t* sub_scales(int64_t p) { return sub.data() + p * K / 16 * kPanel; }
  int32_t* bases(int64_t p) { return base.data() + p * K / kBlock * kPanel; }

  int64_t K;
  std::vector<uint8_t> wp;
  std::vector<float> s, mn;
  std::vector<int32_t> sub, base;  // 6-bit panels only
};

// y [M, N] = the panels' columns times the quantized activations: output columns in groups
// of kGemmPanels panels across intra-op threads, each group laid out once by `layout(n0,
// p, panels)` (panel p of the group, columns from n0; false: a value out of range, which
// raises `refusal`) and read by every activation row in tiles: `tile(rows, panels, m, n0,
// y)` for rows (a std::integral_constant) activation rows from m.
template <typename Layout, typename Tile>
at::Tensor panel_gemm(const QuantizedInput& in, int64_t N, bool six_bit, const Layout& layout,
                      const Tile& tile, const char* refusal) {
  const int64_t M = in.xq.size(0), K = in.xq.size(1);
  at::Tensor y = at::empty({M, N}, in.dx.options());
  float* yp = y.data_ptr<float>();
  constexpr int64_t columns = kPanel * kGemmPanels;
  std::atomic<bool> in_range{true};
  at::parallel_for(0, (N + columns - 1) / columns, 1, [&](int64_t g0, int64_t g1) {
    Panels panels(K, six_bit);  // this thread's, laid out once and read by every row
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * columns;
      for (int64_t p = 0; p < kGemmPanels; ++p) {
        if (!layout(n0 + p * kPanel, p, panels)) {
          in_range.store(false);
          return;
        }
      }
      int64_t m = 0;
      for (; m + kGemmRows <= M; m += kGemmRows) {
        tile(std::integral_constant<int, kGemmRows>{}, panels, m, n0, yp);
      }
      for (; m < M; ++m) tile(std::integral_constant<int, 1>{}, panels, m, n0, yp);
    }
  });
  TORCH_CHECK(in_range.load(), refusal);
  return y;
}

// The tile of int4 and 5-bit panels (Q quads per int16 sum) over `in`'s activations.
template <int Q>
auto minimum_form_tile(const QuantizedInput& in, int64_t N, int64_t K) {
  return [xq = in.xq.data_ptr<int8_t>(), dx = in.dx.data_ptr<float>(),
          xsum = in.xsum.data_ptr<float>(), N, K](auto rows, Panels& pn, int64_t m, int64_t n0,
                                                   float* y) {
    gemm_tile<decltype(rows)::value, kGemmPanels, Q>(pn.weights(0), pn.scales(0), pn.minima(0),
                                                     xq, dx, xsum, y, m, n0, N, K);
  };
}

}  // namespace

// Called by decode_layer.cpp too.
namespace ragqa {

common::PlainActivations quantize_plain(const at::Tensor& x, bool unsigned_bytes) {
  QuantizedInput in = quantize_input(
      x, false, unsigned_bytes ? ActivationLayout::kInt8Avx512 : ActivationLayout::kPlain);
  return {in.xq, in.dx};
}

bool avx512_kernels_on() { return avx512_on(); }

// x [M, K] float32, qw [N, K] int8, scales [N, K/32] float16 -> [M, N] float32.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales) {
  TORCH_CHECK(qw.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "qw must be int8 and scales float16");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  TORCH_CHECK(qw.size(1) == K && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) * kBlock == K,
              "weight shapes do not match K = ", K, " (scales must be [N, K/32])");
  const bool avx512 = avx512_on();
  const QuantizedInput in = quantize_input(
      x, false, avx512 ? ActivationLayout::kInt8Avx512 : ActivationLayout::kPlain);
  const at::Tensor wc = qw.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = wc.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const int8_t* xqp = in.xq.data_ptr<int8_t>();
  const float* dxp = in.dx.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, [&](auto mt, int64_t n0, int64_t n1, int64_t m) {
    if (avx512) {
      dot_rows_q8_avx512<decltype(mt)::value>(wp, sp, xqp, dxp, yp, n0, n1, m, N, K);
    } else {
      dot_rows_q8<decltype(mt)::value>(wp, sp, xqp, dxp, yp, n0, n1, m, N, K);
    }
  });
  return y;
}

// x [M, K] float32, qs [N, K/2] uint8, sm [N, K/g, 2] float16 -> [M, N] float32.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sm,
                     int64_t group) {
  TORCH_CHECK(qs.scalar_type() == at::kByte && sm.scalar_type() == at::kHalf,
              "qs must be uint8 and sm float16");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(group % kBlock == 0 && group > 0 && K % group == 0,
              "group must be a multiple of 32 dividing K, got group ", group, " and K ", K);
  TORCH_CHECK(K % (2 * kBlock) == 0, "int4 weights come in pairs of blocks: K must be a "
              "multiple of 64, got ", K);
  TORCH_CHECK(qs.size(1) * 2 == K && sm.size(0) == N && sm.size(1) == K / group,
              "weight shapes do not match K = ", K);
  const bool avx512 = avx512_on();
  const QuantizedInput in =
      quantize_input(x, true, avx512 ? ActivationLayout::kInt4Avx512 : ActivationLayout::kPlain);
  const at::Tensor qc = qs.contiguous(), sc = sm.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const int8_t* xqp = in.xq.data_ptr<int8_t>();
  const float* dxp = in.dx.data_ptr<float>();
  const float* xsp = in.xsum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, [&](auto mt, int64_t n0, int64_t n1, int64_t m) {
    if (avx512) {
      dot_rows_avx512<decltype(mt)::value>(qp, sp, xqp, dxp, xsp, yp, n0, n1, m, N, K, group);
    } else {
      dot_rows<decltype(mt)::value>(qp, sp, xqp, dxp, xsp, yp, n0, n1, m, N, K, group);
    }
  });
  return y;
}

// x [M, K] float32, qs [N, K/2] uint8, sm [N, K/g, 2] float16 -> [M, N] float32: the
// product q4_linear computes, for many activation rows (the panel GEMM above; AVX2 only,
// whatever kernel_isa says). Its outputs differ from q4_linear's by float rounding only.
at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sm,
                   int64_t group) {
  TORCH_CHECK(qs.scalar_type() == at::kByte && sm.scalar_type() == at::kHalf,
              "qs must be uint8 and sm float16");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K] float32");
  const int64_t K = x.size(1), N = qs.size(0);
  TORCH_CHECK(group % kBlock == 0 && group > 0 && K % group == 0 && K % (2 * kBlock) == 0,
              "group must be a multiple of 32 dividing K (a multiple of 64), got group ", group,
              " and K ", K);
  TORCH_CHECK(qs.size(1) * 2 == K && sm.dim() == 3 && sm.size(0) == N &&
                  sm.size(1) == K / group && sm.size(2) == 2,
              "weight shapes do not match K = ", K);
  const at::Tensor qc = qs.contiguous(), sc = sm.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const QuantizedInput in = quantize_gemm_input(x, false);
  return panel_gemm(
      in, N, false,
      [&](int64_t n0, int64_t p, Panels& pn) {
        layout_panel_q4(qp, sp, n0, N, K, group, pn.weights(p), pn.scales(p), pn.minima(p));
        return true;
      },
      minimum_form_tile<8>(in, N, K), "");
}

// x [M, K] float32, qw [N, K] int8 with every value in -16..15, scales [N, K/32] float16
// -> [M, N] float32: the product q8_linear computes, for many activation rows. Weights
// outside -16..15 are refused (RuntimeError), not wrapped.
at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales) {
  TORCH_CHECK(qw.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "qw must be int8 and scales float16");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K] float32");
  const int64_t K = x.size(1), N = qw.size(0);
  TORCH_CHECK(qw.dim() == 2 && qw.size(1) == K && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) * kBlock == K,
              "weight shapes do not match K = ", K, " (scales must be [N, K/32])");
  const at::Tensor wc = qw.contiguous(), sc = scales.contiguous();
  const int8_t* wp8 = wc.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const QuantizedInput in = quantize_gemm_input(x, true);
  return panel_gemm(
      in, N, false,
      [&](int64_t n0, int64_t p, Panels& pn) {
        return layout_panel_q5(wp8, sp, n0, N, K, pn.weights(p), pn.scales(p), pn.minima(p));
      },
      minimum_form_tile<4>(in, N, K),
      "q8_gemm takes int8 weights in -16..15 (a GGUF's Q5_0 blocks); these hold values "
      "outside that range");
}

// x [M, K] float32, q [N, K] int8 with every value in -32..31, scales [N, K/16] int8, d
// [N, K/256] float16 -> [M, N] float32: x times the weights w = q * scale * d of a GGUF's
// Q6_K blocks (K a multiple of 256), on the panel GEMM (AVX2). Activations are int8 per
// block of 32 as in the other kernels. Weights outside -32..31 are refused (RuntimeError).
at::Tensor q6_gemm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                   const at::Tensor& d) {
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kChar &&
                  d.scalar_type() == at::kHalf,
              "q and scales must be int8 and d float16");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K] float32");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % 256 == 0, "6-bit weights come in blocks of 256 inputs: K must be a multiple "
              "of 256, got ", K);
  TORCH_CHECK(q.dim() == 2 && q.size(1) == K && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) * 16 == K && d.dim() == 2 && d.size(0) == N &&
                  d.size(1) * 256 == K,
              "weight shapes do not match K = ", K, " (scales must be [N, K/16], d [N, K/256])");
  const at::Tensor qc = q.contiguous(), sc = scales.contiguous(), dc = d.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const int8_t* scp = sc.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dc.data_ptr<at::Half>());
  // x + 128 as unsigned bytes, blocks in input order: the AVX-512 int8 kernel's layout.
  const QuantizedInput in = quantize_input(x, false, ActivationLayout::kInt8Avx512);
  const uint8_t* xq = reinterpret_cast<const uint8_t*>(in.xq.data_ptr<int8_t>());
  const float* dx = in.dx.data_ptr<float>();
  return panel_gemm(
      in, N, true,
      [&](int64_t n0, int64_t p, Panels& pn) {
        return layout_panel_q6(qp, scp, dp, n0, N, K, pn.weights(p), pn.scales(p),
                               pn.sub_scales(p), pn.bases(p));
      },
      [&](auto rows, Panels& pn, int64_t m, int64_t n0, float* y) {
        gemm_tile_q6<decltype(rows)::value, kGemmPanels>(
            pn.weights(0), pn.scales(0), pn.sub_scales(0), pn.bases(0), xq, dx, y, m, n0, N, K);
      },
      "q6_gemm takes int8 weights in -32..31 (a GGUF's Q6_K blocks); these hold values "
      "outside that range");
}

// Weights expanded back to float for a long prefill, where an fp32 GEMM beats these
// kernels (they convert and scale per block of 32 for every activation row). Writing into
// a caller's buffer lets one scratch serve every layer: a fresh tensor of this size is
// mapped and page-faulted anew by every call.

// The caller's buffer for an expanded [N, K] weight, checked to hold exactly `numel` floats.
static float* expansion_buffer(const at::Tensor& out, int64_t numel) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == numel,
              "out must be a contiguous float32 tensor of ", numel, " elements");
  return out.data_ptr<float>();
}

// qw [N, K] int8, scales [N, K/32] float16 -> out [N, K] float32, w = q * d.
void q8_dequantize(const at::Tensor& qw, const at::Tensor& scales, const at::Tensor& out) {
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "qw must be [N, K] int8 and scales float16");
  const int64_t N = qw.size(0), K = qw.size(1), nb = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == nb,
              "scales must be [N, K/32] for qw of shape [", N, ", ", K, "]");
  const at::Tensor wc = qw.contiguous(), sc = scales.contiguous();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  float* op = expansion_buffer(out, N * K);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* q = wp + n * K + b * kBlock;
        float* o = op + n * K + b * kBlock;
        const __m256 d = _mm256_set1_ps(half_to_float(sp[n * nb + b]));
        for (int i = 0; i < 4; ++i) {
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
          _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8))));
        }
      }
    }
  });
}

// qs [N, K/2] uint8, sm [N, K/g, 2] float16 -> out [N, K] float32, w = q * s + m.
void q4_dequantize(const at::Tensor& qs, const at::Tensor& sm, int64_t group,
                   const at::Tensor& out) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && sm.scalar_type() == at::kHalf,
              "qs must be [N, K/2] uint8 and sm float16");
  const int64_t N = qs.size(0), K = qs.size(1) * 2;
  TORCH_CHECK(group % kBlock == 0 && group > 0 && K % group == 0 && K % (2 * kBlock) == 0,
              "group must be a multiple of 32 dividing K (a multiple of 64), got group ", group,
              " and K ", K);
  const int64_t ng = K / group, per_group = group / kBlock;
  TORCH_CHECK(sm.dim() == 3 && sm.size(0) == N && sm.size(1) == ng && sm.size(2) == 2,
              "sm must be [N, K/group, 2] for qs of shape [", N, ", ", K / 2, "]");
  const at::Tensor qc = qs.contiguous(), sc = sm.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  float* op = expansion_buffer(out, N * K);
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < K / kBlock; ++b) {
        // Block b's 32 values: the low nibbles of its pair's 32 bytes for an even b, the
        // high ones for an odd b.
        const uint8_t* pair = qp + n * (K / 2) + (b / 2) * kBlock;
        const int64_t g = b / per_group;
        const __m256 s = _mm256_set1_ps(half_to_float(sp[(n * ng + g) * 2]));
        const __m256 m = _mm256_set1_ps(half_to_float(sp[(n * ng + g) * 2 + 1]));
        float* o = op + n * K + b * kBlock;
        for (int half = 0; half < 2; ++half) {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16 * half));
          if (b % 2) bytes = _mm_srli_epi16(bytes, 4);
          bytes = _mm_and_si128(bytes, low_mask);
          const __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
          const __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
          _mm256_storeu_ps(o + 16 * half, _mm256_fmadd_ps(v0, s, m));
          _mm256_storeu_ps(o + 16 * half + 8, _mm256_fmadd_ps(v1, s, m));
        }
      }
    }
  });
}

// Whether this CPU can run the AVX-512 VNNI kernels (avx512f, bw, vl, dq and vnni).
bool avx512_vnni_supported() { return cpu_has_avx512_vnni(); }

// "avx512-vnni" or "avx2": the kernels q4_linear, q8_linear and q6k_linear run.
std::string kernel_isa() { return avx512_on() ? "avx512-vnni" : "avx2"; }

// Chooses the kernels ("avx2" or "avx512-vnni", which needs a CPU with it) and returns the
// previous choice: for tests and benchmarks that compare the two paths on one machine.
std::string set_kernel_isa(std::string isa) {
  TORCH_CHECK(isa == "avx2" || isa == "avx512-vnni",
              "kernel isa must be avx2 or avx512-vnni, got ", isa);
  TORCH_CHECK(isa == "avx2" || cpu_has_avx512_vnni(),
              "this CPU has no AVX-512 VNNI (needs avx512f, bw, vl, dq and vnni)");
  std::string previous = kernel_isa();
  avx512_wanted().store(isa == "avx512-vnni");
  return previous;
}

}  // namespace ragqa

TORCH_LIBRARY(ragqa_qmatmul, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor sm, int group) -> Tensor");
  m.def("q4_gemm(Tensor x, Tensor qs, Tensor sm, int group) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor qw, Tensor scales) -> Tensor");
  m.def("q6_gemm(Tensor x, Tensor q, Tensor scales, Tensor d) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qw, Tensor scales) -> Tensor");
  m.def("q8_dequantize(Tensor qw, Tensor scales, Tensor(a!) out) -> ()");
  m.def("q4_dequantize(Tensor qs, Tensor sm, int group, Tensor(a!) out) -> ()");
  // No tensor arguments, so no dispatch key: one kernel for every backend.
  m.def("avx512_vnni_supported() -> bool", &ragqa::avx512_vnni_supported);
  m.def("kernel_isa() -> str", &ragqa::kernel_isa);
  m.def("set_kernel_isa(str isa) -> str", &ragqa::set_kernel_isa);
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) {
  m.impl("q4_linear", &ragqa::q4_linear);
  m.impl("q4_gemm", &ragqa::q4_gemm);
  m.impl("q8_gemm", &ragqa::q8_gemm);
  m.impl("q6_gemm", &ragqa::q6_gemm);
  m.impl("q8_linear", &ragqa::q8_linear);
  m.impl("q8_dequantize", &ragqa::q8_dequantize);
  m.impl("q4_dequantize", &ragqa::q4_dequantize);
}
