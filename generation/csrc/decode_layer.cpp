// A decoder layer of a quantized decode step in two calls, for lean_decode.py.
//
// Around its matmuls a decode step is some forty small tensor ops per layer (norms, rotary
// embeddings, slices, residual adds, SiLU), each paying Python's call and argument parsing:
// on the 0.5B int8 model at a 600-token context they took ~9 ms of a ~34 ms step besides
// the kernels and the attention. Here the same ATen ops run in the same order as
// lean_decode's Python (which repeats transformers' Llama/Qwen2 layer), so every float is
// the same; only the interpreter is gone. The layer is split where the Python code appends
// the new key and value to the caches, which it grows in place (generation/kv.py).
//
// Weights are the quantized kernels' packs, each projection with its own group: 0 selects
// the int8 kernel (qw [N, K] int8, scales [N, K/32] fp16), > 0 the int4 one (qs [N, K/2],
// sm [N, K/g, 2]), -1 the 6-bit one (a GGUF's Q6_K blocks: q6k_linear.cpp). A model
// quantized from its GGUF mixes them (generation/gguf_packs.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace ragqa {
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sm,
                     int64_t group);
at::Tensor q6k_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sw);
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const std::optional<at::Tensor>& mask,
                            double scale);
}  // namespace ragqa

namespace {

// lean_decode._rms_norm (transformers' RMSNorm): x [..., H] -> [..., H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  const at::Tensor normed = h * at::rsqrt(variance + eps);
  return weight * normed.to(x.scalar_type());
}

// QuantizedLinear.forward / SiblingGroup.compute for a decode step: x [B, 1, K] -> [B, N].
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                   const std::optional<at::Tensor>& bias, int64_t group) {
  const at::Tensor flat = x.reshape({-1, x.size(-1)}).to(at::kFloat);
  at::Tensor y = group > 0    ? ragqa::q4_linear(flat, weight, scales, group)
                 : group < 0 ? ragqa::q6k_linear(flat, weight, scales)
                             : ragqa::q8_linear(flat, weight, scales);
  y = y.to(x.scalar_type());
  if (bias.has_value()) y = y + *bias;
  return y;
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// h [B, 1, H] -> q [B, Hq, 1, D], k and v [B, Hkv, 1, D], rotary applied to q and k
// (cos, sin [B, 1, 1, D]); q/k/v come from one stacked projection.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_layer_inputs(
    const at::Tensor& h, const at::Tensor& norm_weight, double eps, const at::Tensor& qkv_weight,
    const at::Tensor& qkv_scales, const std::optional<at::Tensor>& qkv_bias, int64_t group,
    int64_t q_heads, int64_t kv_heads, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t b = h.size(0), d = cos.size(-1);
  const at::Tensor y = project(rms_norm(h, norm_weight, eps), qkv_weight, qkv_scales, qkv_bias,
                               group);  // [B, (Hq + 2 Hkv) D]
  const int64_t qk_width = (q_heads + kv_heads) * d;
  TORCH_CHECK(y.size(1) == qk_width + kv_heads * d, "the stacked q/k/v projection gives ",
              y.size(1), " outputs, not ", qk_width + kv_heads * d);
  at::Tensor qk = y.slice(1, 0, qk_width).view({b, -1, 1, d});
  qk = qk * cos + rotate_half(qk) * sin;
  const at::Tensor v = y.slice(1, qk_width).view({b, -1, 1, d});
  return {qk.slice(1, 0, q_heads), qk.slice(1, q_heads), v};
}

// The rest of the layer once keys and values [B, Hkv, T, D] hold the new position:
// attention (mask [B, T] bool or none), o_proj and the residual, the post-attention norm,
// the SiLU-gated MLP (gate and up stacked, gate first) and its residual. -> [B, 1, H].
at::Tensor decode_layer_output(
    const at::Tensor& h, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& mask, double scale, const at::Tensor& o_weight,
    const at::Tensor& o_scales, const std::optional<at::Tensor>& o_bias,
    const at::Tensor& norm_weight, double eps, const at::Tensor& gate_up_weight,
    const at::Tensor& gate_up_scales, const std::optional<at::Tensor>& gate_up_bias,
    int64_t gate_width, const at::Tensor& down_weight, const at::Tensor& down_scales,
    const std::optional<at::Tensor>& down_bias, int64_t o_group, int64_t gate_up_group,
    int64_t down_group) {
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(3);
  // float32 queries, out rounded to the model's dtype (attention.py's decode_attention)
  const at::Tensor attn =
      ragqa::decode_attention(q.reshape({b, hq, d}).to(at::kFloat), keys, values, mask, scale)
          .to(q.scalar_type())
          .view({b, 1, hq, d});
  const at::Tensor o = project(attn.reshape({b, 1, -1}).contiguous(), o_weight, o_scales, o_bias,
                               o_group);  // [B, H]
  const at::Tensor mid = h + o.reshape({b, 1, -1});
  const at::Tensor y = project(rms_norm(mid, norm_weight, eps), gate_up_weight, gate_up_scales,
                               gate_up_bias, gate_up_group);  // [B, 2 I]
  const at::Tensor act = at::silu(y.slice(1, 0, gate_width)) * y.slice(1, gate_width);
  const at::Tensor down =
      project(act.unsqueeze(1), down_weight, down_scales, down_bias, down_group);
  return mid + down.reshape({b, 1, -1});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragqa_qmatmul, m) {
  m.def(
      "decode_layer_inputs(Tensor h, Tensor norm_weight, float eps, Tensor qkv_weight, "
      "Tensor qkv_scales, Tensor? qkv_bias, int group, int q_heads, int kv_heads, Tensor cos, "
      "Tensor sin) -> (Tensor, Tensor, Tensor)");
  m.def(
      "decode_layer_output(Tensor h, Tensor q, Tensor keys, Tensor values, Tensor? mask, "
      "float scale, Tensor o_weight, Tensor o_scales, Tensor? o_bias, Tensor norm_weight, "
      "float eps, Tensor gate_up_weight, Tensor gate_up_scales, Tensor? gate_up_bias, "
      "int gate_width, Tensor down_weight, Tensor down_scales, Tensor? down_bias, int o_group, "
      "int gate_up_group, int down_group) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragqa_qmatmul, CPU, m) {
  m.impl("decode_layer_inputs", &decode_layer_inputs);
  m.impl("decode_layer_output", &decode_layer_output);
}
