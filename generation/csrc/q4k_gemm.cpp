// A GGUF's Q4_K blocks x int8 activations: the AVX2 GEMM of long prefills for the
// projections whose file stores them so (most of the 1.5B's weights).
//
// The int4 panel GEMM (panel_gemm.cpp) scales every block of 32 in floats: its weights'
// scale s and the activations' dx are both per block, so each block of each output takes a
// widening madd, a multiply, a conversion and two multiply-adds (the scale and the minimum
// term), a fifth of a 3 x 2 tile's vector instructions. Q4_K's scales are integers within
// each 256 inputs: w = d sc_j q - dmin m_j, with sc_j and m_j 6-bit codes for sub-block j
// (32 inputs) and float16 d and dmin per 256. With activations quantized per 256 as well
// (one dx a row per 256, as llama.cpp's Q8_K), madd multiplies each block's int16 sums by
// sc_j in place of 1, the 8 blocks add up in int32, and floats are touched once per 256:
//   y[m, n] = sum_S d[n,S] dx[m,S] sum_{j in S} sc_j[n] sum_{k in j} q x
//           + sum_j (-dmin[n,S] m_j[n]) xsum[m,j],
// xsum the blocks' float sums of the activations (as the int4 GEMM's minimum term), added
// at the end of each 256 while the int16 sums' registers are free. Bounds: 8 quads' int16
// sums at most 8 * 2 * 15 * 127 = 30480, madd by a code of at most 255 sums two of them,
// 8 blocks: 8 * 2 * 30480 * 255 < 2^31, so int32 is exact for any code byte.
// One thread, 621 rows, the 1.5B's shapes (machine AD, Zen 3; throwaway C++ copy of both
// tiles): 0.87-0.90x the int4 3 x 2 tile's time at K 1536 and 8960.
// AVX2 only: on AVX-512 VNNI a vpdpbusd does a quad's products and sums in one instruction
// and the int4 GEMM's wide tiles serve Q4_K too (QuantizedLinear.forward chooses).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernel_common.h"
#include "panel_common.h"

#include <cstdint>
#include <type_traits>

namespace {

using namespace ragqa::common;
using namespace ragqa::panel;

constexpr int64_t kSuper = 256;  // inputs of a Q4_K block: one d, dmin and activation scale
constexpr int kRows = 3;         // activation rows of a register tile (as the int4 GEMM's)

// x [M, K] float32 (K a multiple of 256) -> int8 activations in input order, one scale per
// 256 inputs (dx [M, K/256]) and each 32's float sum (xsum [M, K/32]).
BlockActivations quantize_superblocks(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), ns = K / kSuper, nb = K / kBlock;
  const at::Tensor xc = x.contiguous();
  BlockActivations in{at::empty({M, K}, x.options().dtype(at::kChar)),
                      at::empty({M, ns}, x.options()), at::empty({M, nb}, x.options())};
  const float* xp = xc.data_ptr<float>();
  int8_t* xqp = in.xq.data_ptr<int8_t>();
  float* dxp = in.dx.data_ptr<float>();
  float* xsp = in.xsum.data_ptr<float>();
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, M * ns, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // superblock i % ns of row i / ns
      const float* p = xp + i * kSuper;
      __m256 amax = _mm256_setzero_ps();
      for (int64_t b = 0; b < kSuper / kBlock; ++b) {
        __m256 v[4];
        for (int k = 0; k < 4; ++k) {
          v[k] = _mm256_loadu_ps(p + b * kBlock + 8 * k);
          amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[k]));
        }
        xsp[i * 8 + b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
      }
      const float d = hmax(amax) / 127.0f;
      dxp[i] = d;
      const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
      for (int64_t b = 0; b < kSuper / kBlock; ++b) {
        __m256 v[4];
        for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(p + b * kBlock + 8 * k);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xqp + i * kSuper + b * kBlock),
                            quantize32(v, inv));
      }
    }
  });
  return in;
}

// Columns [n0, n0 + 8) of Q4_K weights -> one panel: wp from the nibbles (layout_nibbles),
// sub [K/32][8] each block's sc as two int16 lanes (madd's multiplier), mn [K/32][8] its
// minimum -dmin m, s [K/256][8] each 256's d. codes [N, K/32, 2] (sc, m), dd [N, K/256, 2]
// float16 (d, dmin). Columns at or past N are zero.
void layout_panel_q4k(const uint8_t* qs, const uint8_t* codes, const uint16_t* dd, int64_t n0,
                      int64_t N, int64_t K, const PanelDest& out) {
  const int64_t nb = K / kBlock, ns = K / kSuper, cstride = out.column_stride;
  layout_nibbles(qs, n0, N, K, out);
  for (int64_t l = 0; l < kPanel; ++l) {
    const bool real = n0 + l < N;
    for (int64_t S = 0; S < ns; ++S) {
      const uint16_t* pair = dd + ((n0 + l) * ns + S) * 2;
      const float d = real ? half_to_float(pair[0]) : 0.0f;
      const float dmin = real ? half_to_float(pair[1]) : 0.0f;
      out.s[S * cstride + l] = d;
      for (int64_t b = S * 8; b < S * 8 + 8; ++b) {
        const uint8_t* code = codes + ((n0 + l) * nb + b) * 2;
        const uint32_t sc = real ? code[0] : 0;
        out.sub[b * cstride + l] = static_cast<int32_t>((sc << 16) | sc);
        out.mn[b * cstride + l] = real ? -dmin * static_cast<float>(code[1]) : 0.0f;
      }
    }
  }
}

// Activation rows [m0, m0 + R) times P consecutive Q4_K panels (wp, s, mn, sub: the first;
// the next follow at K * 8 bytes, K / 32 * 8 floats and K / 16 * 8 int32, as Panels lays
// them out) into y columns [n0, n0 + 8P), those < N.
template <int R, int P>
void gemm_tile_q4k(const uint8_t* wp, const float* s, const float* mn, const int32_t* sub,
                   const int8_t* xq, const float* dx, const float* xsum, const GemmOut& y, int64_t m0,
                   int64_t n0, int64_t N, int64_t K) {
  const int64_t nb = K / kBlock, ns = K / kSuper, panel_bytes = K * kPanel,
                panel_blocks = nb * kPanel, panel_subs = K / 16 * kPanel;
  // In memory: touched once per 256 inputs, and the int16 and int32 sums of a 3 x 2 tile
  // with its broadcasts fill the 16 registers.
  alignas(32) float acc[R][P][kPanel] = {};
  for (int64_t S = 0; S < ns; ++S) {
    __m256i total[R][P];  // int32: sum_j sc_j sum_{k in j} q x over this 256, exact
    // Zeroed, not started by the first block: a select between the two in the loop made gcc
    // copy the sums between registers (62 moves a block's two loop copies).
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) total[r][p] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int64_t b = S * 8; b < S * 8 + 8; ++b) {
      __m256i sums[R][P];  // int16, exact (see above)
      quad_products<R, P, true>(wp, xq, sums, m0, b * 8, panel_bytes, K);
      // A constant count, unrolled: with the int4 GEMM's bounds (b * 8 + 1 .. b * 8 + 8) gcc
      // kept a loop here, whose carried sums cost a register copy each per quad.
#pragma GCC unroll 8
      for (int i = 1; i < 8; ++i) {
        quad_products<R, P, false>(wp, xq, sums, m0, b * 8 + i, panel_bytes, K);
      }
      for (int p = 0; p < P; ++p) {
        const __m256i sc = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(sub + p * panel_subs + b * kPanel));
        for (int r = 0; r < R; ++r) {
          total[r][p] = _mm256_add_epi32(total[r][p], _mm256_madd_epi16(sums[r][p], sc));
        }
      }
    }
    // Floats once per 256: the minimum terms of its 8 blocks, then its scale times the sums.
    __m256 a[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) a[r][p] = _mm256_load_ps(acc[r][p]);
    for (int64_t b = S * 8; b < S * 8 + 8; ++b) {
      for (int p = 0; p < P; ++p) {
        const __m256 mv = _mm256_loadu_ps(mn + p * panel_blocks + b * kPanel);
        for (int r = 0; r < R; ++r) {
          a[r][p] = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(xsum + (m0 + r) * nb + b), a[r][p]);
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      const __m256 dv = _mm256_loadu_ps(s + p * panel_blocks + S * kPanel);
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_mul_ps(dv, _mm256_broadcast_ss(dx + (m0 + r) * ns + S));
        _mm256_store_ps(acc[r][p],
                        _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(total[r][p]), a[r][p]));
      }
    }
  }
  __m256 out[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) out[r][p] = _mm256_load_ps(acc[r][p]);
  store_tile<R, P>(out, y, m0, n0, N);
}

}  // namespace

namespace ragqa {

// x [M, K] float32 (K a multiple of 256), qs [N, K/2] uint8 (the int4 packs' nibbles),
// codes [N, K/32, 2] uint8 (each block's sc and m), dd [N, K/256, 2] float16 (d, dmin) ->
// [M, N] float32: x times the Q4_K weights w = d sc q - dmin m, on the AVX2 panel GEMM with
// activations in int8 per 256 inputs.
at::Tensor q4k_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& codes,
                    const at::Tensor& dd) {
  TORCH_CHECK(qs.scalar_type() == at::kByte && codes.scalar_type() == at::kByte &&
                  dd.scalar_type() == at::kHalf,
              "qs and codes must be uint8 and dd float16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  const int64_t K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % kSuper == 0, "Q4_K weights come in blocks of 256 inputs: K must be a "
              "multiple of 256, got ", K);
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) * 2 == K && codes.dim() == 3 && codes.size(0) == N &&
                  codes.size(1) == K / kBlock && codes.size(2) == 2 && dd.dim() == 3 &&
                  dd.size(0) == N && dd.size(1) == K / kSuper && dd.size(2) == 2,
              "weight shapes do not match K = ", K,
              " (qs must be [N, K/2], codes [N, K/32, 2], dd [N, K/256, 2])");
  const at::Tensor qc = qs.contiguous(), cc = codes.contiguous(), dc = dd.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dc.data_ptr<at::Half>());
  const BlockActivations in = quantize_superblocks(x);
  const int8_t* xq = in.xq.data_ptr<int8_t>();
  const float* dx = in.dx.data_ptr<float>();
  const float* xsum = in.xsum.data_ptr<float>();
  return panel_gemm<kRows>(
      in, N, PanelKind::kQ4K, kGemmPanels, false,
      [&](int64_t n0, const PanelDest& out) {
        layout_panel_q4k(qp, cp, dp, n0, N, K, out);
        return true;
      },
      [&](auto rows, Panels& pn, int64_t m, int64_t n0, const GemmOut& y) {
        const PanelDest d = pn.dest(0);
        gemm_tile_q4k<decltype(rows)::value, kGemmPanels>(d.wp, d.s, d.mn, d.sub, xq, dx, xsum,
                                                          y, m, n0, N, K);
      },
      "");
}

}  // namespace ragqa

TORCH_LIBRARY_FRAGMENT(ragqa_qmatmul, m) {
  m.def("q4k_gemm(Tensor x, Tensor qs, Tensor codes, Tensor dd) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) { m.impl("q4k_gemm", &ragqa::q4k_gemm); }
