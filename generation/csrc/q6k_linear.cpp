// 6-bit weights (a GGUF's Q6_K blocks, as they are) x int8 activations, for decode steps
// (AVX2, and AVX-512 VNNI where the CPU has it), and their expansion back to float.
//
// Requantized to int8, a Q6_K tensor costs 34 bytes per 32 weights and rounds the model's
// weights a second time; its own blocks are 210 bytes per 256 (26.25 per 32) and exact.
// On the 1.5B those tensors are the vocabulary projection and half the down projections,
// 40 % of the bytes a decode step reads with RAGQA_QUANTIZATION=gguf.
//
// Packs, per output row n and block of 256 inputs ("superblock") s:
//   qw [N, K/256 * 192] uint8: the block's first 192 bytes as GGUF stores them: 128 bytes
//       of low nibbles, then 64 of top bit pairs. Each half h of 128 weights takes nibble
//       bytes 64h..64h+63 and pair bytes 32h..32h+31: nibble byte l (l < 32) holds weight
//       128h + l low and 128h + 64 + l high, byte 32 + l weights 128h + 32 + l and
//       128h + 96 + l; pair byte l the top bits of 128h + l, +32, +64 and +96, two each
//       from the lowest. Values are stored as q + 32, 0..63.
//   sw [N, K/256 * 18] uint8: the block's 16 int8 scales c (one per 16 weights, in order)
//       and its float16 d: w = (stored - 32) * c * d.
// With activations x = xq * dx (int8 per block of 32, as in qmatmul.cpp; in two parts,
// each part's sums are joined in integers first, as there):
//   y[n] = sum_s d_s sum_{16 inputs t} c_t dx_{b(t)} (sum (stored - 32) xq)
// maddubs takes the stored values (unsigned, at most 63) against the signed activations,
// a lane at most 2 * 63 * 127 = 16002 (no saturation); the -32 sum xq of each 16 inputs
// comes off in integers, from sums computed once per call (`offsets`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"

namespace {

using namespace ragqa::common;

constexpr int64_t kSuper = 256;      // inputs of a Q6_K block
constexpr int64_t kValueBytes = 192;  // its nibble and bit-pair bytes
constexpr int64_t kScaleBytes = 18;   // its 16 scales and float16 d

// Two rounds of hadd turn the 4 blocks of a half into one vector of their 8 sums of 16
// inputs in this order: [t0, t2, t4, t6 | t1, t3, t5, t7] (t: 16 inputs of the half).
// The scales and offsets are laid out in the same order, so no permute is needed.
constexpr int kSubOrder[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};

// -> [M, K/16] int32: 32 * the sum of each 16 int8 activations, each superblock's 16 in
// kSubOrder: what the stored values' +32 adds to their products.
std::vector<int32_t> offsets(const int8_t* xq, int64_t M, int64_t K) {
  std::vector<int32_t> out(M * (K / 16));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < K / kSuper; ++s) {
      const int8_t* x = xq + m * K + s * kSuper;
      int32_t* o = out.data() + m * (K / 16) + s * 16;
      for (int slot = 0; slot < 16; ++slot) {
        int32_t total = 0;
        for (int k = 0; k < 16; ++k) total += x[kSubOrder[slot] * 16 + k];
        o[slot] = 32 * total;
      }
    }
  }
  return out;
}

// A superblock's float16 d, after its 16 scales (`sc`: the superblock's 18 scale bytes).
inline float superblock_d(const uint8_t* sc) {
  uint16_t d_bits;
  std::memcpy(&d_bits, sc + 16, sizeof d_bits);
  return half_to_float(d_bits);
}

// One half of a superblock against one activation row: its 8 sums of 16 inputs of
// stored * xq, in kSubOrder (v: the half's 4 blocks of 32 stored values).
inline __m256i half_sums(const __m256i v[4], const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * j));
    // lanes 0-3: inputs 0-15 of block j, 4 each; lanes 4-7: inputs 16-31
    s[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(v[j], xv), ones);
  }
  return _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
}

// Rows [n0, n1) for activation rows [m0, m0 + MT). Each output row keeps one accumulator
// per activation row and adds its halves in order, so an output is the same float
// whatever the tile size (a request decodes the same tokens alone or in a batch).
// With Fine, xr and off_r are the activations' residual part and its offsets, and each
// sum is (sum over xq) << kFineBits + sum over xr (kernel_common.h, kFineBits).
template <int MT, bool Fine>
void dot_rows_q6k(const uint8_t* qw, const uint8_t* sw, const int8_t* xq, const int8_t* xr,
                  const float* dx, const int32_t* off, const int32_t* off_r, float* y, int64_t n0,
                  int64_t n1, int64_t m0, int64_t N, int64_t K) {
  const int64_t ns = K / kSuper, nb = K / kBlock, nt = K / 16;
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qw + n * ns * kValueBytes;
    const uint8_t* srow = sw + n * ns * kScaleBytes;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const uint8_t* q = qrow + s * kValueBytes;
      prefetch_ahead<3>(q);  // the superblock's 192 value bytes
      const uint8_t* sc = srow + s * kScaleBytes;
      // c * d per 16 inputs, in kSubOrder: half 0's 8, then half 1's
      const __m128i c = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)),
                                         order);
      const __m256 d = _mm256_set1_ps(superblock_d(sc));
      const __m256 cd[2] = {
          _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c))),
          _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8))))};
      for (int h = 0; h < 2; ++h) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * h));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * h + 32));
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128 + 32 * h));
        // Blocks of weights 128h + 32j + l: nibbles of a (j = 0, 2) or b (1, 3) and bit
        // pairs 2j of t moved to bits 4-5. 16-bit shifts carry bits between bytes; the
        // masks keep only each byte's own.
        const __m256i v[4] = {
            _mm256_or_si256(_mm256_and_si256(a, low4),
                            _mm256_and_si256(_mm256_slli_epi16(t, 4), top2)),
            _mm256_or_si256(_mm256_and_si256(b, low4),
                            _mm256_and_si256(_mm256_slli_epi16(t, 2), top2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                            _mm256_and_si256(t, top2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4),
                            _mm256_and_si256(_mm256_srli_epi16(t, 2), top2))};
        for (int i = 0; i < MT; ++i) {
          const int64_t row = m0 + i;
          const int64_t at = row * K + s * kSuper + 128 * h, slot = row * nt + s * 16 + 8 * h;
          auto load = [](const int32_t* p) {
            return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          };
          __m256i sums = _mm256_sub_epi32(half_sums(v, xq + at), load(off + slot));
          if constexpr (Fine) {
            sums = join_parts(sums, _mm256_sub_epi32(half_sums(v, xr + at), load(off_r + slot)));
          }
          // lane t < 4: block t of the half, lane t >= 4: block t - 4
          const __m256 dxv =
              _mm256_broadcast_ps(reinterpret_cast<const __m128*>(dx + row * nb + s * 8 + 4 * h));
          acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(cd[h], dxv), _mm256_cvtepi32_ps(sums), acc[i]);
        }
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = hsum(acc[i]);
  }
}

// The same rows on AVX-512 VNNI, activations stored as x + 128 (unsigned bytes, the
// kInt8Avx512 layout) and weights as stored - 32 (signed): vpdpbusd sums 4 products a
// lane, sum (x + 128) w = sum x w + 128 sum w, and 128 sum w = 128 (sum stored - 128) comes
// off through each lane's starting value, computed once per weight vector for every
// activation row (no per-row offsets, no horizontal adds). A superblock is 4 vectors of
// 64 consecutive inputs; its 16 lanes of 4 inputs take c * d of their 16 inputs and dx of
// their 32. A lane reaches 4 * 255 * 32 = 32640 from a start within +-16384: no overflow,
// and exact as a float.
// With Fine, xr is the residual part (also x + 128), whose sums start from the first
// part's shifted by kFineBits plus the same base: a lane then reaches 257 * 4 * 127 * 32,
// still exact as a float (< 2^24).
template <int MT, bool Fine>
RAGQA_AVX512 void dot_rows_q6k_avx512(const uint8_t* qw, const uint8_t* sw, const uint8_t* xu,
                                      const uint8_t* xr, const float* dx, float* y, int64_t n0,
                                      int64_t n1, int64_t m0, int64_t N, int64_t K) {
  const int64_t ns = K / kSuper, nb = K / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30);
  const __m512i bias = _mm512_set1_epi8(32), minus128 = _mm512_set1_epi8(-128);
  const __m512i start = _mm512_set1_epi32(16384);  // 128 * the 4 lanes' -32 offsets
  // Shifts bringing bit pairs 0 / 1 (first vector of a half) and 2 / 3 (second) to bits 4-5:
  // the 256-bit halves of a vector hold blocks j and j + 1 of the half. 64-bit lanes carry
  // bits between bytes as 16-bit ones would, and the masks keep only each byte's own.
  const __m512i up = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2);
  const __m512i down = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
  // group g of 16 inputs takes block g / 2's dx; vector z's lane l group 4z + l / 4
  const __m512i pair_of = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  __m512i group_of[4];
  for (int z = 0; z < 4; ++z) {
    group_of[z] = _mm512_add_epi32(
        _mm512_set1_epi32(4 * z),
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qw + n * ns * kValueBytes;
    const uint8_t* srow = sw + n * ns * kScaleBytes;
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const uint8_t* q = qrow + s * kValueBytes;
      prefetch_ahead<3>(q);  // the superblock's 192 value bytes
      const uint8_t* sc = srow + s * kScaleBytes;
      // c * d of the 16 groups, in order
      const __m512 cd = _mm512_mul_ps(
          _mm512_set1_ps(superblock_d(sc)),
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)))));
      __m512i w[4], base[4];
      for (int h = 0; h < 2; ++h) {
        const __m512i ab = _mm512_loadu_si512(q + 64 * h);
        const __m512i t = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128 + 32 * h)));
        // inputs 128h + [0, 64): low nibbles of ab, and inputs 128h + [64, 128): high ones;
        // ternary logic 0xEC: (a & c) | b, the nibble's mask and the or in one instruction
        const __m512i v[2] = {
            _mm512_ternarylogic_epi32(
                ab, _mm512_and_si512(_mm512_sllv_epi64(t, up), top2), low4, 0xEC),
            _mm512_ternarylogic_epi32(_mm512_srli_epi16(ab, 4),
                                      _mm512_and_si512(_mm512_srlv_epi64(t, down), top2), low4,
                                      0xEC)};
        for (int j = 0; j < 2; ++j) {
          base[2 * h + j] = _mm512_dpbusd_epi32(start, v[j], minus128);
          w[2 * h + j] = _mm512_sub_epi8(v[j], bias);
        }
      }
      for (int i = 0; i < MT; ++i) {
        const int64_t row = m0 + i;
        const __m512 dx16 = _mm512_permutexvar_ps(
            pair_of, _mm512_castps256_ps512(_mm256_loadu_ps(dx + row * nb + s * 8)));
        const __m512 scale = _mm512_mul_ps(cd, dx16);  // per group of 16 inputs
        const uint8_t* x = xu + row * K + s * kSuper;
        const uint8_t* r = xr + row * K + s * kSuper;
        for (int z = 0; z < 4; ++z) {
          __m512i sums = _mm512_dpbusd_epi32(base[z], _mm512_loadu_si512(x + 64 * z), w[z]);
          if constexpr (Fine) {
            sums = _mm512_dpbusd_epi32(
                _mm512_add_epi32(_mm512_slli_epi32(sums, kFineBits), base[z]),
                _mm512_loadu_si512(r + 64 * z), w[z]);
          }
          acc[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(group_of[z], scale),
                                   _mm512_cvtepi32_ps(sums), acc[i]);
        }
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = _mm512_reduce_add_ps(acc[i]);
  }
}

void check_packs(const at::Tensor& qw, const at::Tensor& sw, int64_t K) {
  TORCH_CHECK(qw.scalar_type() == at::kByte && sw.scalar_type() == at::kByte,
              "6-bit packs must be uint8");
  TORCH_CHECK(K % kSuper == 0, "6-bit weights come in blocks of 256 inputs: K must be a "
              "multiple of 256, got ", K);
  TORCH_CHECK(qw.dim() == 2 && sw.dim() == 2 && sw.size(0) == qw.size(0) &&
                  qw.size(1) == K / kSuper * kValueBytes && sw.size(1) == K / kSuper * kScaleBytes,
              "6-bit pack shapes do not match K = ", K, ": qw must be [N, K/256*192] and sw "
              "[N, K/256*18], got ", qw.sizes(), " and ", sw.sizes());
}

}  // namespace

namespace ragqa {

// x [M, K] float32, qw [N, K/256*192] uint8, sw [N, K/256*18] uint8 -> [M, N] float32.
at::Tensor q6k_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sw) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [M, K] float32");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  check_packs(qw, sw, K);
  const bool avx512 = avx512_kernels_on(), fine = two_part_activations();
  const common::PlainActivations in = quantize_plain(x, avx512, fine);
  const at::Tensor qc = qw.contiguous(), sc = sw.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  const int8_t* xqp = in.xq.data_ptr<int8_t>();
  const int8_t* xrp = fine ? in.xr.data_ptr<int8_t>() : xqp;  // unread in one part
  const float* dxp = in.dx.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (avx512) {
    const uint8_t* xup = reinterpret_cast<const uint8_t*>(xqp);
    const uint8_t* xrup = reinterpret_cast<const uint8_t*>(xrp);
    for_tiles(M, N, [&](auto mt, int64_t n0, int64_t n1, int64_t m) {
      constexpr int kMT = decltype(mt)::value;
      (fine ? dot_rows_q6k_avx512<kMT, true> : dot_rows_q6k_avx512<kMT, false>)(
          qp, sp, xup, xrup, dxp, yp, n0, n1, m, N, K);
    });
    return y;
  }
  const std::vector<int32_t> off = offsets(xqp, M, K);
  const std::vector<int32_t> off_r = fine ? offsets(xrp, M, K) : std::vector<int32_t>{};
  const int32_t* off_rp = fine ? off_r.data() : off.data();
  for_tiles(M, N, [&](auto mt, int64_t n0, int64_t n1, int64_t m) {
    constexpr int kMT = decltype(mt)::value;
    (fine ? dot_rows_q6k<kMT, true> : dot_rows_q6k<kMT, false>)(
        qp, sp, xqp, xrp, dxp, off.data(), off_rp, yp, n0, n1, m, N, K);
  });
  return y;
}

// qw, sw as q6k_linear's -> out [N, K] float32, the weights they stand for (written in
// place: one scratch serves every layer, as for q8_dequantize).
void q6k_dequantize(const at::Tensor& qw, const at::Tensor& sw, const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "out must be a contiguous [N, K] float32 tensor");
  const int64_t N = out.size(0), K = out.size(1);
  TORCH_CHECK(qw.size(0) == N, "out has ", N, " rows, the packs ", qw.size(0));
  check_packs(qw, sw, K);
  const at::Tensor qc = qw.contiguous(), sc = sw.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t ns = K / kSuper;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t s = 0; s < ns; ++s) {
        const uint8_t* q = qp + (n * ns + s) * kValueBytes;
        const uint8_t* scales = sp + (n * ns + s) * kScaleBytes;
        const float d = superblock_d(scales);
        float* o = op + n * K + s * kSuper;
        for (int64_t w = 0; w < kSuper; ++w) {
          const int64_t h = w / 128, j = (w % 128) / 32, l = w % 32;
          const uint8_t nibble_byte = q[64 * h + 32 * (j & 1) + l];
          const int nibble = j < 2 ? nibble_byte & 0xF : nibble_byte >> 4;
          const int top = (q[128 + 32 * h + l] >> (2 * j)) & 3;
          const int c = static_cast<int8_t>(scales[w / 16]);
          o[w] = static_cast<float>((nibble | (top << 4)) - 32) * static_cast<float>(c) * d;
        }
      }
    }
  });
}

}  // namespace ragqa

TORCH_LIBRARY_FRAGMENT(ragqa_qmatmul, m) {
  m.def("q6k_linear(Tensor x, Tensor qw, Tensor sw) -> Tensor");
  m.def("q6k_dequantize(Tensor qw, Tensor sw, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) {
  m.impl("q6k_linear", &ragqa::q6k_linear);
  m.impl("q6k_dequantize", &ragqa::q6k_dequantize);
}
