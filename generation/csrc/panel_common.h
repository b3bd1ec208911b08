// What the AVX2 panel GEMMs of long prefills share (panel_gemm.cpp: int4, 5- and 6-bit
// packs; q4k_gemm.cpp: a GGUF's Q4_K blocks): where a panel's parts go, the 8 x 8
// transpose that lays weights out in panels, the int16 products of a quad, the store of a
// register tile, each thread's panel buffers and the loop that hands column groups to
// threads. Header-only (qmatmul.py hashes it into the build flags, so a change rebuilds).
//
// A panel is 8 output columns side by side: an output column's 4 consecutive inputs sit in
// one int32 lane ([K/4][8][4] bytes), so one 4-byte broadcast of an activation row's quad
// meets 8 columns at once.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "kernel_common.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ragqa::panel {

using common::BlockActivations;
using common::kBlock;

constexpr int64_t kPanel = 8;    // output columns of a panel: one int32 lane each
constexpr int kGemmPanels = 2;   // panels of a register tile

// Where one 8-column panel's parts go: quad q of its columns at wp + q * quad_stride, and
// column l's value of block (or 16 inputs) b at s[b * column_stride + l], likewise mn, sub
// and base. The AVX2 GEMM reads panels alone (strides 32 bytes and 8 columns); the
// AVX-512 one reads two side by side (64 and 16; the second panel 32 bytes and 8 columns
// in).
struct PanelDest {
  uint8_t* wp;
  float* s;
  float* mn;
  int32_t* sub;
  int32_t* base;
  int64_t quad_stride, column_stride;
};

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

// Columns [n0, n0 + 8) of int4 nibbles (qs [N, K/2], each 64 inputs 32 bytes: the first 32
// in the low nibbles, the next 32 in the high ones) -> out.wp [K/4][8][4] values 0..15.
// Columns at or past N are zero.
inline void layout_nibbles(const uint8_t* qs, int64_t n0, int64_t N, int64_t K,
                           const PanelDest& out) {
  const int64_t qstride = out.quad_stride;
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
    uint8_t* quads = out.wp + c * 16 * qstride;  // 16 quads of 8 columns x 4 bytes
    for (int j = 0; j < 8; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(quads + j * qstride), lo[j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(quads + (8 + j) * qstride), hi[j]);
    }
  }
}

// A GEMM's output y [M, N]: float32, or bfloat16 where its activations came in bfloat16
// (a bfloat16 model's prefill). Writing bfloat16 in the tile store saves the pass over a
// float32 output that .to(torch.bfloat16) made: in a 1.5B integer prefill those
// conversions and the inputs' widening were 12 % of the profile (torch.profiler, Zen 4).
struct GemmOut {
  void* base;
  bool bf16;
};

// 8 floats -> their bfloat16 bits, rounded to nearest even as torch rounds (NaN -> 0x7FC0,
// c10::BFloat16's), so a bfloat16 output holds the bits of the float32 one's conversion.
inline __m128i bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  // Per 128-bit lane, the 4 values twice; quads 0 and 2 are the 8 in order.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// R x P float accumulators -> y columns [n0, n0 + 8P), those < N, of rows [m0, m0 + R).
template <int R, int P>
void store_tile(const __m256 acc[R][P], const GemmOut& y, int64_t m0, int64_t n0, int64_t N) {
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) {
      const int64_t n = n0 + p * kPanel;
      if (y.bf16) {
        uint16_t* out = static_cast<uint16_t*>(y.base) + (m0 + r) * N + n;
        const __m128i h = bf16x8(acc[r][p]);
        if (n + kPanel <= N) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out), h);
        } else if (n < N) {
          alignas(16) uint16_t tail[kPanel];
          _mm_store_si128(reinterpret_cast<__m128i*>(tail), h);
          std::memcpy(out, tail, (N - n) * sizeof(uint16_t));
        }
        continue;
      }
      float* out = static_cast<float*>(y.base) + (m0 + r) * N + n;
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

// Quad q of activation rows [m0, m0 + R) times quad q of P consecutive panels, into the
// int16 sums (Start: the products become the sums).
template <int R, int P, bool Start>
inline void quad_products(const uint8_t* wp, const int8_t* xq, __m256i sums[R][P], int64_t m0,
                          int64_t q, int64_t panel_bytes, int64_t K) {
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
      const __m256i products = _mm256_maddubs_epi16(w, xb[r]);
      sums[r][p] = Start ? products : _mm256_add_epi16(sums[r][p], products);
    }
  }
  // An empty asm per sum, once the quad's products are all added: without it gcc regroups
  // a block's additions into a tree of 32 live maddubs results and spills them; placed
  // after each addition instead in this unrolled form, gcc loaded each weight vector once
  // per row.
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) asm volatile("" : "+x"(sums[r][p]));
}

// What a panel holds beside its weights: a scale and a minimum per block (int4 and 5-bit
// panels), a scale per block, a c per 16 inputs and an offset per block (6-bit ones), or
// a scale per 256, a minimum and an integer scale per block (Q4_K ones).
enum class PanelKind { kMinimum, kSixBit, kQ4K };

// One thread's panels of a column group (`count` of them): each buffer holds them one
// after another, or with `wide` in pairs side by side (PanelDest says where each goes).
struct Panels {
  Panels(int64_t k, PanelKind kind, int64_t count, bool wide)
      : K(k),
        wide(wide),
        wp(count * k * kPanel),
        s(count * k / kBlock * kPanel),
        mn(kind == PanelKind::kSixBit ? 0 : s.size()),
        sub(kind == PanelKind::kMinimum ? 0 : count * k / 16 * kPanel),
        base(kind == PanelKind::kSixBit ? s.size() : 0) {}

  // Where panel p's parts go; those its kind lacks are null.
  PanelDest dest(int64_t p) {
    // Offsets in panels' worth of each part, and within a wide pair.
    const int64_t first = wide ? p / 2 * 2 : p, half = wide ? p % 2 : 0;
    const int64_t nb = K / kBlock, cols = half * kPanel;
    auto at = [](auto& v, int64_t offset) { return v.empty() ? nullptr : v.data() + offset; };
    return {wp.data() + first * K * kPanel + half * 32,
            at(s, first * nb * kPanel + cols),
            at(mn, first * nb * kPanel + cols),
            at(sub, first * K / 16 * kPanel + cols),
            at(base, first * nb * kPanel + cols),
            wide ? 64 : 32,
            wide ? 2 * kPanel : kPanel};
  }

  int64_t K;
  bool wide;
  std::vector<uint8_t> wp;
  std::vector<float> s, mn;
  // sub: a 6-bit panel's c per 16 inputs, a Q4_K panel's integer scales per 32 (in the
  // first half); base: 6-bit panels only.
  std::vector<int32_t> sub, base;
};

// y [M, N] = the panels' columns times the quantized activations: output columns in groups
// of `count` panels across intra-op threads, each group laid out once by `layout(n0,
// dest)` (one panel's columns from n0 into dest; false: a value out of range, which raises
// `refusal`) and read by every activation row in tiles: `tile(rows, panels, m, n0, y)` for
// rows (a std::integral_constant: Rows, or 1 for the last rows) activation rows from m.
template <int Rows, typename Layout, typename Tile>
at::Tensor panel_gemm(const BlockActivations& in, int64_t N, PanelKind kind, int64_t count,
                      bool wide, const Layout& layout, const Tile& tile, const char* refusal) {
  const int64_t M = in.xq.size(0), K = in.xq.size(1);
  at::Tensor y = at::empty({M, N}, in.dx.options().dtype(in.bf16 ? at::kBFloat16 : at::kFloat));
  const GemmOut yp{y.data_ptr(), in.bf16};
  const int64_t columns = kPanel * count, groups = (N + columns - 1) / columns;
  std::atomic<bool> in_range{true};
  // Each thread claims the next group as it finishes one, where an even split would give
  // each thread a fixed half: on a shared machine one CPU often runs slower than the
  // other, and the faster then waited at the end of every call (libgomp's spin was 4.3 %
  // of a 1.5B prefill's CPU samples on machine AD, 2.3 % with this). A group's outputs
  // do not depend on which thread computes them.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(groups, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Panels panels(K, kind, count, wide);  // this thread's, laid out once for every row
    for (int64_t g = next.fetch_add(1); g < groups; g = next.fetch_add(1)) {
      const int64_t n0 = g * columns;
      for (int64_t p = 0; p < count; ++p) {
        if (!layout(n0 + p * kPanel, panels.dest(p))) {
          in_range.store(false);
          return;
        }
      }
      int64_t m = 0;
      for (; m + Rows <= M; m += Rows) tile(std::integral_constant<int, Rows>{}, panels, m, n0, yp);
      for (; m < M; ++m) tile(std::integral_constant<int, 1>{}, panels, m, n0, yp);
    }
  });
  TORCH_CHECK(in_range.load(), refusal);
  return y;
}

}  // namespace ragqa::panel
