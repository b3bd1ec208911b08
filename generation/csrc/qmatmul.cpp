// int4- and int8-weight x int8-activation matrix products for CPU decode steps (AVX2, and
// AVX-512 VNNI where the CPU has it).
//
// torch's weight-only int4 kernel converts every weight to float before multiplying; on a
// 2-core CPU that makes a decode step compute-bound at about half of llama.cpp's speed.
// Here, as in llama.cpp's Q4 x Q8 dot products, the activations are quantized to int8 per
// block of 32 and the products are summed in integers (maddubs + madd), so one 256-bit
// instruction pair does 32 multiply-adds; floats appear once per 8 blocks of 32. Unlike
// llama.cpp, decode steps by default take the activations in two int8 parts, the second
// rounding what the first leaves (kernel_common.h, kFineBits): twice the integer products
// for activations 256 times finer, the weights' bytes read once either way.
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
// term to feed). dx and xsum are in input order whatever the layout. With `xr`, the
// residual part goes there in the same layout and dx is d / 2^kFineBits (kFineBits).
void quantize_activations(const float* x, int64_t M, int64_t K, bool sums,
                          ActivationLayout layout, int8_t* xq, float* dx, float* xsum,
                          int8_t* xr) {
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
      const float inv = d > 0.0f ? 1.0f / d : 0.0f;
      __m256 t[4];
      round32(v, _mm256_set1_ps(inv), t);
      // x + 128 as a byte: flipping the top bit maps -127..127 to 1..255
      const int64_t slot = m * K + block_slot(b, nb, layout) * kBlock;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + slot),
                          _mm256_xor_si256(pack32(t), offset));
      if (xr == nullptr) {
        dx[m * nb + b] = d;
        continue;
      }
      constexpr float kFine = 1 << kFineBits;
      dx[m * nb + b] = d / kFine;  // exact: a power of two
      const __m256i r = residual32(v, t, _mm256_set1_ps(d), _mm256_set1_ps(inv * kFine));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xr + slot), _mm256_xor_si256(r, offset));
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

// The activations of one call, quantized once and read by every output row.
using QuantizedInput = BlockActivations;

QuantizedInput quantize_input(const at::Tensor& x, bool sums, ActivationLayout layout,
                              bool two_parts) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
  const at::Tensor xc = x.contiguous();
  const int64_t nb = K / kBlock;
  const auto bytes = x.options().dtype(at::kChar);
  QuantizedInput in{at::empty({M, K}, bytes), at::empty({M, nb}, x.options()),
                    at::empty({M, sums ? nb : 0}, x.options()),
                    at::empty({M, two_parts ? K : 0}, bytes)};
  const float* xp = xc.data_ptr<float>();
  int8_t* xqp = in.xq.data_ptr<int8_t>();
  float* dxp = in.dx.data_ptr<float>();
  float* xsp = in.xsum.data_ptr<float>();
  int8_t* xrp = two_parts ? in.xr.data_ptr<int8_t>() : nullptr;
  // Rows in parallel for a prefill's hundreds; a decode step's few (at most 16) stay on
  // the calling thread.
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    quantize_activations(xp + m0 * K, m1 - m0, K, sums, layout, xqp + m0 * K, dxp + m0 * nb,
                         sums ? xsp + m0 * nb : xsp, two_parts ? xrp + m0 * K : nullptr);
  });
  return in;
}

// Whether decode kernels take two-part activations (kFineBits); tests and benchmarks may
// ask for one part, the prefill GEMMs' rounding.
std::atomic<bool>& two_parts_wanted() {
  static std::atomic<bool> wanted{true};
  return wanted;
}

}  // namespace

// Called by decode_layer.cpp, q6k_linear.cpp and panel_gemm.cpp too.
namespace ragqa {

common::BlockActivations quantize_blocks(const at::Tensor& x, bool sums, bool unsigned_bytes) {
  return quantize_input(
      x, sums, unsigned_bytes ? ActivationLayout::kInt8Avx512 : ActivationLayout::kPlain, false);
}

common::PlainActivations quantize_plain(const at::Tensor& x, bool unsigned_bytes,
                                        bool two_parts) {
  QuantizedInput in = quantize_input(
      x, false, unsigned_bytes ? ActivationLayout::kInt8Avx512 : ActivationLayout::kPlain,
      two_parts);
  return {in.xq, in.dx, in.xr};
}

bool two_part_activations() { return two_parts_wanted().load(std::memory_order_relaxed); }

// Chooses one-part (false) or two-part (true) activations for the decode kernels and
// returns the previous choice: for tests and benchmarks comparing the two.
bool set_two_part_activations(bool on) { return two_parts_wanted().exchange(on); }

bool avx512_kernels_on() { return avx512_on(); }

// x [M, K] float32, qw [N, K] int8, scales [N, K/32] float16 -> [M, N] float32.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales) {
  TORCH_CHECK(qw.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "qw must be int8 and scales float16");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  TORCH_CHECK(qw.size(1) == K && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) * kBlock == K,
              "weight shapes do not match K = ", K, " (scales must be [N, K/32])");
  const bool avx512 = avx512_on(), fine = two_part_activations();
  const QuantizedInput in = quantize_input(
      x, false, avx512 ? ActivationLayout::kInt8Avx512 : ActivationLayout::kPlain, fine);
  const at::Tensor wc = qw.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = wc.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const int8_t* xqp = in.xq.data_ptr<int8_t>();
  const int8_t* xrp = fine ? in.xr.data_ptr<int8_t>() : xqp;  // unread in one part
  const float* dxp = in.dx.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, [&](auto mt, int64_t n0, int64_t n1, int64_t m) {
    constexpr int kMT = decltype(mt)::value;
    if (avx512) {
      (fine ? dot_rows_q8_avx512<kMT, true> : dot_rows_q8_avx512<kMT, false>)(
          wp, sp, xqp, xrp, dxp, yp, n0, n1, m, N, K);
    } else {
      (fine ? dot_rows_q8<kMT, true> : dot_rows_q8<kMT, false>)(wp, sp, xqp, xrp, dxp, yp, n0,
                                                                 n1, m, N, K);
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
  const bool avx512 = avx512_on(), fine = two_part_activations();
  const QuantizedInput in = quantize_input(
      x, true, avx512 ? ActivationLayout::kInt4Avx512 : ActivationLayout::kPlain, fine);
  const at::Tensor qc = qs.contiguous(), sc = sm.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const int8_t* xqp = in.xq.data_ptr<int8_t>();
  const int8_t* xrp = fine ? in.xr.data_ptr<int8_t>() : xqp;  // unread in one part
  const float* dxp = in.dx.data_ptr<float>();
  const float* xsp = in.xsum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(M, N, [&](auto mt, int64_t n0, int64_t n1, int64_t m) {
    constexpr int kMT = decltype(mt)::value;
    if (avx512) {
      (fine ? dot_rows_avx512<kMT, true> : dot_rows_avx512<kMT, false>)(
          qp, sp, xqp, xrp, dxp, xsp, yp, n0, n1, m, N, K, group);
    } else {
      (fine ? dot_rows<kMT, true> : dot_rows<kMT, false>)(qp, sp, xqp, xrp, dxp, xsp, yp, n0, n1,
                                                         m, N, K, group);
    }
  });
  return y;
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
  m.def("q8_linear(Tensor x, Tensor qw, Tensor scales) -> Tensor");
  m.def("q8_dequantize(Tensor qw, Tensor scales, Tensor(a!) out) -> ()");
  m.def("q4_dequantize(Tensor qs, Tensor sm, int group, Tensor(a!) out) -> ()");
  // No tensor arguments, so no dispatch key: one kernel for every backend.
  m.def("avx512_vnni_supported() -> bool", &ragqa::avx512_vnni_supported);
  m.def("kernel_isa() -> str", &ragqa::kernel_isa);
  m.def("set_kernel_isa(str isa) -> str", &ragqa::set_kernel_isa);
  m.def("two_part_activations() -> bool", &ragqa::two_part_activations);
  m.def("set_two_part_activations(bool on) -> bool", &ragqa::set_two_part_activations);
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) {
  m.impl("q4_linear", &ragqa::q4_linear);
  m.impl("q8_linear", &ragqa::q8_linear);
  m.impl("q8_dequantize", &ragqa::q8_dequantize);
  m.impl("q4_dequantize", &ragqa::q4_dequantize);
}
