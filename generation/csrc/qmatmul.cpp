// int4- and int8-weight x int8-activation matrix products for CPU decode steps (AVX2, and
// AVX-512 VNNI where the CPU has it).
// This file quantizes the activations and splits each call into tiles; the kernels
// that multiply are in decode_avx2.h and decode_avx512.h.
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

#include "decode_avx2.h"
#include "decode_avx512.h"
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
using namespace ragqa::decode;

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
// 8 inputs as floats: float32, or bfloat16 (the top half of a float32's bits: exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename In>  // float (float32) or uint16_t (bfloat16 bits)
void quantize_activations(const In* x, int64_t M, int64_t K, bool sums,
                          ActivationLayout layout, int8_t* xq, float* dx, float* xsum,
                          int8_t* xr) {
  const int64_t nb = K / kBlock;
  const __m256i offset = _mm256_set1_epi8(layout == ActivationLayout::kInt8Avx512 ? -128 : 0);
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const In* row = x + m * K;
    for (int64_t b = 0; b < nb; ++b) {
      const In* p = row + b * kBlock;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = load8(p + 8 * i);
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

// The activations of one call, quantized once and read by every output row.
using QuantizedInput = BlockActivations;

// x [M, K] float32, or bfloat16 where `bf16_ok` (the GEMMs, which then write bfloat16).
QuantizedInput quantize_input(const at::Tensor& x, bool sums, ActivationLayout layout,
                              bool two_parts, bool bf16_ok = false) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || (bf16_ok && bf16)),
              bf16_ok ? "x must be [M, K] float32 or bfloat16" : "x must be [M, K] float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
  const at::Tensor xc = x.contiguous();
  const int64_t nb = K / kBlock;
  const auto bytes = x.options().dtype(at::kChar), floats = x.options().dtype(at::kFloat);
  QuantizedInput in{at::empty({M, K}, bytes), at::empty({M, nb}, floats),
                    at::empty({M, sums ? nb : 0}, floats), at::empty({M, two_parts ? K : 0}, bytes),
                    bf16};
  int8_t* xqp = in.xq.data_ptr<int8_t>();
  float* dxp = in.dx.data_ptr<float>();
  float* xsp = in.xsum.data_ptr<float>();
  int8_t* xrp = two_parts ? in.xr.data_ptr<int8_t>() : nullptr;
  // Rows in parallel for a prefill's hundreds; a decode step's few (at most 16) stay on
  // the calling thread.
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    float* xs = sums ? xsp + m0 * nb : xsp;
    int8_t* xr = two_parts ? xrp + m0 * K : nullptr;
    if (bf16) {
      const auto* xh = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
      quantize_activations(xh + m0 * K, m1 - m0, K, sums, layout, xqp + m0 * K, dxp + m0 * nb,
                           xs, xr);
    } else {
      quantize_activations(xc.data_ptr<float>() + m0 * K, m1 - m0, K, sums, layout,
                           xqp + m0 * K, dxp + m0 * nb, xs, xr);
    }
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
  return quantize_input(x, sums,
                        unsigned_bytes ? ActivationLayout::kInt8Avx512 : ActivationLayout::kPlain,
                        false, true);
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
