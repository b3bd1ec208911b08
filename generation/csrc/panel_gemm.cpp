// int4 / int5 / int6 x int8 GEMM for long prefills (AVX2, and AVX-512 VNNI where the CPU
// has it and kernel_isa says so), on the packs the decode kernels read.
//
// The decode kernels (qmatmul.cpp) walk one weight row at a time and convert, scale and add every
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
//
// AVX-512 VNNI: two panels side by side in each 64-byte vector (a "wide" panel, [K/4][16][4]
// bytes), so one vpdpbusd multiplies a row's broadcast quad by 16 columns and sums each
// column's 4 products into its int32 lane: one instruction where AVX2 spends a maddubs and
// an add per 8 columns, plus a madd per block. The block sums are the same exact int32
// and every lane's floats are computed in the same order as on AVX2, so the two ISAs give
// bit-identical outputs (tests/test_qmatmul.py checks it). 6-bit panels sum each 16
// inputs in int32 and multiply by c there (vpmulld), where AVX2 lets madd do it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernel_common.h"
#include "panel_common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace ragqa::common;
using namespace ragqa::panel;
using QuantizedInput = BlockActivations;

// Activation rows of a register tile: 3 for int4 panels, 2 for 5- and 6-bit ones.
// 2 x 2 keeps 4 int16 sums (and for 5-bit panels 4 int32 block sums), 4 float
// accumulators, 2 broadcasts and a weight vector in registers; 3 x 2 needs 6 of each
// kind and gcc spills some float accumulators, which are touched once a block. Before
// the int4 tile was unrolled, 3 x 2 was no faster (machines S and T, Zen 3). Unrolled, on
// machine AD (Zen 3), one thread, 623 rows (throwaway C++ copy of these tiles, medians of
// 11 alternated rounds): int4 3 x 2 took 0.92x the time of 2 x 2 at K 8960 and
// 0.93-0.96x at K 1536 and 4864; 5-bit 0.98-1.03x (kept at 2); 6-bit 1.02-1.10x (kept
// at 2). 2 x 3 was 0.95-1.10x; 4 x 1 and 1 x 4 had been 0.47-0.65x on S.
constexpr int kInt4Rows = 3;
constexpr int kGemmRows = 2;
constexpr int kWideRows = 4;     // activation rows of an AVX-512 register tile
constexpr int kWidePanels = 2;   // wide panels (16 columns each) of an AVX-512 register tile
// 4 x 2 keeps 8 int32 block sums, 8 float accumulators and 2 weight vectors in 18 of the
// 32 registers; the broadcasts come from memory with each vpdpbusd.

// Columns [n0, n0 + 8) of int4 packs -> one panel: wp [K/4][8][4] values 0..15, s and mn
// [K/32][8] float (each block's scale and minimum). Columns at or past N are zero.
void layout_panel_q4(const uint8_t* qs, const uint16_t* sm, int64_t n0, int64_t N, int64_t K,
                     int64_t group, const PanelDest& out) {
  const int64_t cstride = out.column_stride;
  const int64_t ng = K / group, per_group = group / kBlock;
  layout_nibbles(qs, n0, N, K, out);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    for (int64_t l = 0; l < kPanel; ++l) {
      const bool real = n0 + l < N;
      const uint16_t* pair = sm + ((n0 + l) * ng + b / per_group) * 2;
      out.s[b * cstride + l] = real ? half_to_float(pair[0]) : 0.0f;
      out.mn[b * cstride + l] = real ? half_to_float(pair[1]) : 0.0f;
    }
  }
}

// Columns [n0, n0 + 8) of int8 packs with values in -16..15 -> one panel: wp [K/4][8][4]
// values q + 16 (0..31), s = mn = [K/32][8] block scales. Columns at or past N are zero.
// Returns false if a value lies outside -16..15 (the panel is then unusable).
bool layout_panel_q5(const int8_t* qw, const uint16_t* dw, int64_t n0, int64_t N, int64_t K,
                     const PanelDest& out) {
  const int64_t nb = K / kBlock, qstride = out.quad_stride, cstride = out.column_stride;
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
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.wp + (b * 8 + j) * qstride), v[j]);
    }
    for (int64_t l = 0; l < kPanel; ++l) {
      const float d = n0 + l < N ? half_to_float(dw[(n0 + l) * nb + b]) : 0.0f;
      out.s[b * cstride + l] = out.mn[b * cstride + l] = d;
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
                     int64_t N, int64_t K, const PanelDest& out) {
  const int64_t nb = K / kBlock, ns = K / 16, nd = K / 256;
  const int64_t qstride = out.quad_stride, cstride = out.column_stride;
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
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.wp + (b * 8 + j) * qstride), v[j]);
        half_sums[h] = _mm256_add_epi32(
            half_sums[h], _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v[j]), ones16));
      }
    }
    alignas(32) int32_t c[2][kPanel];
    for (int64_t l = 0; l < kPanel; ++l) {
      const bool real = n0 + l < N;
      for (int h = 0; h < 2; ++h) {
        c[h][l] = real ? sc[(n0 + l) * ns + 2 * b + h] : 0;
        out.sub[(2 * b + h) * cstride + l] = static_cast<int32_t>(
            (static_cast<uint32_t>(static_cast<uint16_t>(c[h][l])) << 16) |
            static_cast<uint16_t>(c[h][l]));
      }
      out.s[b * cstride + l] = real ? half_to_float(d[(n0 + l) * nd + b / 8]) : 0.0f;
    }
    const __m256i total = _mm256_add_epi32(
        _mm256_mullo_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[0])), half_sums[0]),
        _mm256_mullo_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[1])), half_sums[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.base + b * cstride),
                        _mm256_mullo_epi32(total, _mm256_set1_epi32(-128)));
  }
  return _mm256_testz_si256(largest, _mm256_set1_epi8(static_cast<char>(0xC0)));
}

// Activation rows [m0, m0 + R) times P consecutive panels (wp, s, mn: the first; the next
// follow at K * 8 bytes and K / 32 * 8 floats) into y columns [n0, n0 + 8P), those < N.
// Q quads (4 inputs each) are summed in int16 before each widening: 8 for int4 panels, 4
// for int5 ones (see above).
template <int R, int P, int Q>
void gemm_tile(const uint8_t* wp, const float* s, const float* mn, const int8_t* xq,
               const float* dx, const float* xsum, const GemmOut& y, int64_t m0, int64_t n0, int64_t N,
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
      // The first quad's products start the sums (no zeroing, no add); the rest add on,
      // unrolled: no loop counter among the vector instructions, which alone fill the
      // ports that run maddubs (machine AB, int4 down projection: 0.86x the time of a
      // loop of one quad per iteration, which zeroed the sums and counted quads).
      quad_products<R, P, true>(wp, xq, sums, m0, first, panel_bytes, K);
#pragma GCC unroll 8
      for (int64_t q = first + 1; q < first + Q; ++q) {
        quad_products<R, P, false>(wp, xq, sums, m0, q, panel_bytes, K);
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
                  const uint8_t* xq, const float* dx, const GemmOut& y, int64_t m0, int64_t n0,
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

// 16 floats -> their bfloat16 bits, rounded as bf16x8 rounds (panel_common.h).
RAGQA_AVX512 inline __m256i bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0)));
}

// R x P float accumulators -> y columns [n0, n0 + 16P), those < N, of rows [m0, m0 + R).
template <int R, int P>
RAGQA_AVX512 void store_tile_wide(const __m512 acc[R][P], const GemmOut& y, int64_t m0,
                                  int64_t n0, int64_t N) {
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) {
      const int64_t n = n0 + p * 2 * kPanel;
      // Only read where 0 < N - n < 16.
      const auto tail = static_cast<__mmask16>((1u << ((N - n) & 15)) - 1);
      if (y.bf16) {
        uint16_t* out = static_cast<uint16_t*>(y.base) + (m0 + r) * N + n;
        if (n + 2 * kPanel <= N) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bf16x16(acc[r][p]));
        } else if (n < N) {
          _mm256_mask_storeu_epi16(out, tail, bf16x16(acc[r][p]));
        }
        continue;
      }
      float* out = static_cast<float*>(y.base) + (m0 + r) * N + n;
      if (n + 2 * kPanel <= N) {
        _mm512_storeu_ps(out, acc[r][p]);
      } else if (n < N) {
        _mm512_mask_storeu_ps(out, tail, acc[r][p]);
      }
    }
  }
}

// The 16 columns' floats of block (or 16 inputs) b of wide panel p: lanes 0-7 from its
// first panel, 8-15 from its second (PanelDest).
RAGQA_AVX512 inline __m512 wide_floats(const float* v, int64_t b) {
  return _mm512_loadu_ps(v + b * 2 * kPanel);
}

// gemm_tile on AVX-512 VNNI: activation rows [m0, m0 + R) times P consecutive wide panels
// (wp, s, mn: the first; the next follow at K * 16 bytes and K / 32 * 16 floats) into y
// columns [n0, n0 + 16P), those < N. The weights (0..31) are vpdpbusd's unsigned operand.
template <int R, int P>
RAGQA_AVX512 void gemm_tile_wide(const uint8_t* wp, const float* s, const float* mn,
                                 const int8_t* xq, const float* dx, const float* xsum, const GemmOut& y,
                                 int64_t m0, int64_t n0, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock, panel_bytes = K * 2 * kPanel, panel_scales = nb * 2 * kPanel;
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i block[R][P];  // int32: the block's sums, exact
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) block[r][p] = _mm512_setzero_si512();
    for (int64_t q = b * 8; q < b * 8 + 8; ++q) {
      __m512i w[P];
      for (int p = 0; p < P; ++p) w[p] = _mm512_loadu_si512(wp + p * panel_bytes + q * 64);
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, xq + (m0 + r) * K + q * 4, sizeof quad);
        const __m512i xb = _mm512_set1_epi32(quad);
        for (int p = 0; p < P; ++p) block[r][p] = _mm512_dpbusd_epi32(block[r][p], w[p], xb);
      }
    }
    for (int p = 0; p < P; ++p) {
      const __m512 sv = wide_floats(s + p * panel_scales, b);
      const __m512 mv = wide_floats(mn + p * panel_scales, b);
      for (int r = 0; r < R; ++r) {
        const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(dx[(m0 + r) * nb + b]));
        acc[r][p] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(block[r][p]), acc[r][p]);
        acc[r][p] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[(m0 + r) * nb + b]), acc[r][p]);
      }
    }
  }
  store_tile_wide<R, P>(acc, y, m0, n0, N);
}

// gemm_tile_q6 on AVX-512 VNNI, over P consecutive wide 6-bit panels (wp, s, sub, base: the
// first; the next follow at K * 16 bytes, K / 32 * 16 floats, K / 16 * 16 and K / 32 * 16
// int32). Each 16 inputs' products sum exactly in int32 (at most 16 * 255 * 32) before
// their c multiplies them, so each block's int32 sum equals the AVX2 kernel's.
template <int R, int P>
RAGQA_AVX512 void gemm_tile_q6_wide(const uint8_t* wp, const float* s, const int32_t* sub,
                                    const int32_t* base, const uint8_t* xq, const float* dx,
                                    const GemmOut& y, int64_t m0, int64_t n0, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock, panel_bytes = K * 2 * kPanel, panel_blocks = nb * 2 * kPanel,
                panel_subs = K / 16 * 2 * kPanel;
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i block[R][P];  // int32: the block's sums of (x + 128) q c, exact
    for (int p = 0; p < P; ++p) {
      const __m512i start = _mm512_loadu_si512(base + p * panel_blocks + b * 2 * kPanel);
      for (int r = 0; r < R; ++r) block[r][p] = start;
    }
    for (int64_t h = 0; h < 2; ++h) {
      __m512i c[P];  // each column's c, from the high int16 of its (c, c) pair
      for (int p = 0; p < P; ++p) {
        c[p] = _mm512_srai_epi32(
            _mm512_loadu_si512(sub + p * panel_subs + (2 * b + h) * 2 * kPanel), 16);
      }
      __m512i part[R][P];  // int32: these 16 inputs' sums of (x + 128) q
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) part[r][p] = _mm512_setzero_si512();
      for (int64_t q = b * 8 + 4 * h; q < b * 8 + 4 * h + 4; ++q) {
        __m512i w[P];
        for (int p = 0; p < P; ++p) w[p] = _mm512_loadu_si512(wp + p * panel_bytes + q * 64);
        for (int r = 0; r < R; ++r) {
          int32_t quad;
          std::memcpy(&quad, xq + (m0 + r) * K + q * 4, sizeof quad);
          const __m512i xb = _mm512_set1_epi32(quad);
          for (int p = 0; p < P; ++p) part[r][p] = _mm512_dpbusd_epi32(part[r][p], xb, w[p]);
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int p = 0; p < P; ++p) {
          block[r][p] = _mm512_add_epi32(block[r][p], _mm512_mullo_epi32(part[r][p], c[p]));
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      const __m512 sv = wide_floats(s + p * panel_blocks, b);
      for (int r = 0; r < R; ++r) {
        const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(dx[(m0 + r) * nb + b]));
        acc[r][p] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(block[r][p]), acc[r][p]);
      }
    }
  }
  store_tile_wide<R, P>(acc, y, m0, n0, N);
}

// x [M, K] float32 -> its int8 activations per block of 32 (in input order), their scales
// dx [M, K/32], and the per-row term of each block (xsum [M, K/32]): the exact float sums
// for int4 panels, -16 dx sum(xq) for int5 ones.
QuantizedInput quantize_gemm_input(const at::Tensor& x, bool int5) {
  QuantizedInput in = ragqa::quantize_blocks(x, !int5, false);
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

// panel_gemm on the kernels kernel_isa names: AVX-512 VNNI tiles (`wide_tile`) over wide
// panels, or AVX2 ones (`tile`, Rows activation rows a tile) over panels alone.
template <int Rows, typename Layout, typename Tile, typename WideTile>
at::Tensor isa_gemm(const QuantizedInput& in, int64_t N, PanelKind kind, const Layout& layout,
                    const Tile& tile, const WideTile& wide_tile, const char* refusal) {
  if (ragqa::avx512_kernels_on()) {
    return panel_gemm<kWideRows>(in, N, kind, 2 * kWidePanels, true, layout, wide_tile,
                                 refusal);
  }
  return panel_gemm<Rows>(in, N, kind, kGemmPanels, false, layout, tile, refusal);
}

// The minimum-form tiles (int4 and 5-bit panels; Q quads per int16 sum on AVX2) over
// `in`'s activations, on each ISA.
template <int Q, typename Layout>
at::Tensor minimum_form_gemm(const QuantizedInput& in, int64_t N, int64_t K,
                             const Layout& layout, const char* refusal) {
  const int8_t* xq = in.xq.data_ptr<int8_t>();
  const float* dx = in.dx.data_ptr<float>();
  const float* xsum = in.xsum.data_ptr<float>();
  return isa_gemm<Q == 8 ? kInt4Rows : kGemmRows>(
      in, N, PanelKind::kMinimum, layout,
      [&](auto rows, Panels& pn, int64_t m, int64_t n0, const GemmOut& y) {
        const PanelDest d = pn.dest(0);
        gemm_tile<decltype(rows)::value, kGemmPanels, Q>(d.wp, d.s, d.mn, xq, dx, xsum, y, m,
                                                         n0, N, K);
      },
      [&](auto rows, Panels& pn, int64_t m, int64_t n0, const GemmOut& y) {
        const PanelDest d = pn.dest(0);
        gemm_tile_wide<decltype(rows)::value, kWidePanels>(d.wp, d.s, d.mn, xq, dx, xsum, y, m,
                                                           n0, N, K);
      },
      refusal);
}

}  // namespace

namespace ragqa {

// x [M, K] float32 or bfloat16, qs [N, K/2] uint8, sm [N, K/g, 2] float16 -> [M, N] in x's
// dtype: the product q4_linear computes, for many activation rows (the panel GEMM above, on
// the ISA kernel_isa names). Its outputs differ from q4_linear's by float rounding only; a
// bfloat16 output is the float32 one rounded (GemmOut).
at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sm,
                   int64_t group) {
  TORCH_CHECK(qs.scalar_type() == at::kByte && sm.scalar_type() == at::kHalf,
              "qs must be uint8 and sm float16");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K] float32 or bfloat16");
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
  return minimum_form_gemm<8>(
      in, N, K,
      [&](int64_t n0, const PanelDest& out) {
        layout_panel_q4(qp, sp, n0, N, K, group, out);
        return true;
      },
      "");
}

// x [M, K] float32 or bfloat16, qw [N, K] int8 with every value in -16..15, scales [N, K/32]
// float16 -> [M, N] in x's dtype: the product q8_linear computes, for many activation rows.
// Weights outside -16..15 are refused (RuntimeError), not wrapped.
at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales) {
  TORCH_CHECK(qw.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "qw must be int8 and scales float16");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K] float32 or bfloat16");
  const int64_t K = x.size(1), N = qw.size(0);
  TORCH_CHECK(qw.dim() == 2 && qw.size(1) == K && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) * kBlock == K,
              "weight shapes do not match K = ", K, " (scales must be [N, K/32])");
  const at::Tensor wc = qw.contiguous(), sc = scales.contiguous();
  const int8_t* wp8 = wc.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const QuantizedInput in = quantize_gemm_input(x, true);
  return minimum_form_gemm<4>(
      in, N, K,
      [&](int64_t n0, const PanelDest& out) {
        return layout_panel_q5(wp8, sp, n0, N, K, out);
      },
      "q8_gemm takes int8 weights in -16..15 (a GGUF's Q5_0 blocks); these hold values "
      "outside that range");
}

// x [M, K] float32 or bfloat16, q [N, K] int8 with every value in -32..31, scales [N, K/16]
// int8, d [N, K/256] float16 -> [M, N] in x's dtype: x times the weights w = q * scale * d of a GGUF's
// Q6_K blocks (K a multiple of 256), on the panel GEMM (the ISA kernel_isa names). Activations are int8 per
// block of 32 as in the other kernels. Weights outside -32..31 are refused (RuntimeError).
at::Tensor q6_gemm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                   const at::Tensor& d) {
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kChar &&
                  d.scalar_type() == at::kHalf,
              "q and scales must be int8 and d float16");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K] float32 or bfloat16");
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
  const QuantizedInput in = quantize_blocks(x, false, true);
  const uint8_t* xq = reinterpret_cast<const uint8_t*>(in.xq.data_ptr<int8_t>());
  const float* dx = in.dx.data_ptr<float>();
  return isa_gemm<kGemmRows>(
      in, N, PanelKind::kSixBit,
      [&](int64_t n0, const PanelDest& out) {
        return layout_panel_q6(qp, scp, dp, n0, N, K, out);
      },
      [&](auto rows, Panels& pn, int64_t m, int64_t n0, const GemmOut& y) {
        const PanelDest d = pn.dest(0);
        gemm_tile_q6<decltype(rows)::value, kGemmPanels>(d.wp, d.s, d.sub, d.base, xq, dx, y,
                                                         m, n0, N, K);
      },
      [&](auto rows, Panels& pn, int64_t m, int64_t n0, const GemmOut& y) {
        const PanelDest d = pn.dest(0);
        gemm_tile_q6_wide<decltype(rows)::value, kWidePanels>(d.wp, d.s, d.sub, d.base, xq, dx,
                                                              y, m, n0, N, K);
      },
      "q6_gemm takes int8 weights in -32..31 (a GGUF's Q6_K blocks); these hold values "
      "outside that range");
}

}  // namespace ragqa

TORCH_LIBRARY_FRAGMENT(ragqa_qmatmul, m) {
  m.def("q4_gemm(Tensor x, Tensor qs, Tensor sm, int group) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor qw, Tensor scales) -> Tensor");
  m.def("q6_gemm(Tensor x, Tensor q, Tensor scales, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) {
  m.impl("q4_gemm", &ragqa::q4_gemm);
  m.impl("q8_gemm", &ragqa::q8_gemm);
  m.impl("q6_gemm", &ragqa::q6_gemm);
}
