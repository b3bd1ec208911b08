"""A decode step for Llama/Qwen2-family models that bypasses transformers' forward.

A decode step does little arithmetic besides reading the weights, and on a CPU what
surrounds the matmuls is Python: transformers' forward goes through module call hooks,
output-capturing and config-merging wrappers, a mask builder and a cache object for every
step, each layer and each projection. py-spy on the 0.5B int8 model (a 2-core Zen 1 EPYC,
72 ms steps) put the int8 kernels at 55% of the step; the rest was that bookkeeping and
the small ops between the matmuls.

`LeanDecoder` computes the same step from the model's own modules with the same torch ops
in the same order (RMSNorm in float32 then back to the model dtype, rotary embeddings,
`decode_attention`, SiLU-gated MLP, residual adds), calling each projection's `forward`
directly. Same ops on the same tensors give the same floats, so greedy output does not
change. Where every projection of a layer runs on ragqa's kernels (float32 or bfloat16,
q/k/v and gate/up stacked), the layer's small ops run in C++ instead (csrc/decode_layer.cpp, the
same ATen ops in the same order), in two calls around the KV append.

It applies only where that equivalence was checked: a CPU model of type `llama` or
`qwen2` with full attention in every layer, SiLU activation and no extra attention
features; anything else keeps transformers' forward (`build` returns None).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generation import qmatmul
from generation.attention import decode_attention
from generation.kv import KV, append_kv
from generation.quant import QuantizedLinear
from generation.siblings import SiblingGroup

logger = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "qwen2")


def _projection(module: nn.Module) -> Any:
    """The module's forward without nn.Module.__call__'s hook handling."""
    if type(module) is nn.Linear:
        return lambda x: F.linear(x, module.weight, module.bias)
    return module.forward


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # transformers' LlamaRMSNorm / Qwen2RMSNorm, op for op.
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _group(members: list[nn.Module]) -> SiblingGroup | None:
    """The stacked kernel of q/k/v or gate/up, when `fuse_siblings` built one for them."""
    first = members[0]
    if not all(isinstance(m, QuantizedLinear) for m in members):
        return None
    group = first.siblings
    if group is None or not group.stacked(members):  # type: ignore[arg-type]
        return None
    return group


class _Layer:
    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.attn = attn
        self.q, self.k, self.v = (
            _projection(attn.q_proj),
            _projection(attn.k_proj),
            _projection(attn.v_proj),
        )
        self.o = _projection(attn.o_proj)
        self.gate, self.up = _projection(mlp.gate_proj), _projection(mlp.up_proj)
        self.down = _projection(mlp.down_proj)
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.q_width = attn.q_proj.out_features
        self.qk_width = self.q_width + attn.k_proj.out_features
        self.gate_width = mlp.gate_proj.out_features
        # One kernel call and one slice per stack instead of a call per member.
        self.qkv = _group([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _group([mlp.gate_proj, mlp.up_proj])
        self.first_member = attn.q_proj
        self.fused = _fused_arguments(layer, self.qkv, self.gate_up)

    def stacked(self, group: SiblingGroup | None, rows: int) -> bool:
        """Whether `group` (`qkv` or `gate_up`) computes a batch of `rows` in one call.

        Above `prefill_rows` a QuantizedLinear takes its float weights instead of the
        kernel; the members then run one by one so the floats stay transformers'.
        """
        return group is not None and rows <= self.first_member.prefill_rows

    def attention_inputs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, 1, H] -> q [B, Hq, 1, D], k and v [B, Hkv, 1, D], rotary applied to q, k."""
        b, d = x.shape[0], self.head_dim
        if not self.stacked(self.qkv, b):
            q = self.q(x).view(b, 1, -1, d).transpose(1, 2)
            k = self.k(x).view(b, 1, -1, d).transpose(1, 2)
            v = self.v(x).view(b, 1, -1, d).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            return q, k, v
        assert self.qkv is not None
        y = self.qkv.compute(x)  # [B, Nq + Nk + Nv]
        # Rotating q and k together is elementwise: the same floats as one at a time.
        qk = y[:, : self.qk_width].view(b, -1, 1, d)  # [B, Hq + Hkv, 1, D]
        qk = (qk * cos) + (_rotate_half(qk) * sin)
        hq = self.q_width // d
        v = y[:, self.qk_width :].view(b, -1, 1, d)
        return qk[:, :hq], qk[:, hq:], v

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, H] -> [B, 1, H]."""
        if not self.stacked(self.gate_up, x.shape[0]):
            return self.down(F.silu(self.gate(x)) * self.up(x))
        assert self.gate_up is not None
        y = self.gate_up.compute(x)  # [B, 2 * I]
        hidden = F.silu(y[:, : self.gate_width]) * y[:, self.gate_width :]
        return self.down(hidden.unsqueeze(1))


@dataclass(frozen=True)
class _Fused:
    """The weights and constants of one layer's two C++ calls (csrc/decode_layer.cpp)."""

    inputs: tuple[Any, ...]  # decode_layer_inputs' arguments after h, before cos and sin
    output: tuple[Any, ...]  # decode_layer_output's arguments after the scale


def _fused_arguments(
    layer: nn.Module, qkv: SiblingGroup | None, gate_up: SiblingGroup | None
) -> _Fused | None:
    """A layer's arguments for the C++ path, or None where it must stay in Python."""
    attn, mlp = layer.self_attn, layer.mlp
    o, down = attn.o_proj, mlp.down_proj
    # The C++ path always takes ragqa's attention kernel, which wants head sizes of 8k.
    if qkv is None or gate_up is None or not qmatmul.loaded() or attn.head_dim % 8:
        return None
    single = [o, down]
    if not all(isinstance(m, QuantizedLinear) and m.kernel and m.siblings is None for m in single):
        return None
    # 0 selects the int8 kernel, a group size the int4 one, -1 the 6-bit one; a model
    # quantized from its GGUF mixes them (generation/gguf_packs.py).
    qkv_group, o_group, gate_up_group, down_group = (
        m.group_size if m.mode == "int4" else -1 if m.mode == "q6k" else 0
        for m in (qkv, o, gate_up, down)
    )
    # The C++ ops are those of the Python path in either dtype (the attention kernel reads
    # float32 or bfloat16 caches); float16 keeps the Python path.
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if any(w.dtype not in (torch.float32, torch.bfloat16) for w in norms):
        return None
    heads = attn.q_proj.out_features // attn.head_dim
    kv_heads = attn.k_proj.out_features // attn.head_dim
    inputs = (
        layer.input_layernorm.weight,
        layer.input_layernorm.variance_epsilon,
        qkv.qweight,
        qkv.scales,
        qkv.bias,
        qkv_group,
        heads,
        kv_heads,
    )
    output = (
        o.qweight,
        o.scales,
        o.bias,
        layer.post_attention_layernorm.weight,
        layer.post_attention_layernorm.variance_epsilon,
        gate_up.qweight,
        gate_up.scales,
        gate_up.bias,
        mlp.gate_proj.out_features,
        down.qweight,
        down.scales,
        down.bias,
        o_group,
        gate_up_group,
        down_group,
    )
    return _Fused(inputs, output)


class LeanDecoder:
    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.norm = inner.norm
        self.lm_head = _projection(model.lm_head)

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        """tokens [B], positions [B], mask [B, T+1] (0 = left padding), kv per layer
        [B, Hkv, T, D] -> logits [B, V], kv per layer [B, Hkv, T+1, D] (see `append_kv`).
        """
        b = tokens.shape[0]
        h = F.embedding(tokens.unsqueeze(1), self.embed.weight)  # [B, 1, H]
        cos, sin = self.rotary(h, positions.unsqueeze(1))  # [B, 1, D] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]
        # decode_attention takes a boolean [B, 1, 1, T+1] (True = attend) or None; with
        # no padding the two give the same floats, and None skips the masking op.
        attend_2d = None if bool(mask.all()) else mask.bool()  # [B, T+1] for the C++ path
        attend = None if attend_2d is None else attend_2d[:, None, None, :]
        new_kv: KV = []
        for layer, (keys, values) in zip(self.layers, kv, strict=True):
            if layer.fused is not None and layer.stacked(layer.qkv, b):
                q, k, v = qmatmul.decode_layer_inputs(h, layer.fused.inputs, cos, sin)
                keys, values = append_kv(keys, k), append_kv(values, v)
                new_kv.append((keys, values))
                h = qmatmul.decode_layer_output(
                    h,
                    q,
                    keys,
                    values,
                    attend_2d,
                    layer.scaling,
                    layer.fused.output,
                )
                continue
            residual = h
            x = _rms_norm(h, layer.input_norm)
            q, k, v = layer.attention_inputs(x, cos, sin)
            keys, values = append_kv(keys, k), append_kv(values, v)
            new_kv.append((keys, values))
            out, _ = decode_attention(layer.attn, q, keys, values, attend, scaling=layer.scaling)
            h = residual + layer.o(out.reshape(b, 1, -1).contiguous())
            residual = h
            h = residual + layer.mlp(_rms_norm(h, layer.post_norm))
        h = _rms_norm(h, self.norm)
        return self.lm_head(h)[:, -1], new_kv


def build(model: nn.Module) -> LeanDecoder | None:
    """A LeanDecoder for `model`, or None where transformers' forward must stay."""
    config = getattr(model, "config", None)
    why = _unsupported(model, config)
    if why:
        logger.info("decode steps use transformers' forward: %s", why)
        return None
    return LeanDecoder(model)


def _unsupported(model: nn.Module, config: Any) -> str:
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    if next(model.parameters()).device.type != "cpu":
        return "not on the CPU"
    if getattr(config, "_attn_implementation", None) != "ragqa_cpu_decode":
        return f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window layers"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "rotary_emb", "layers", "norm")
    if inner is None or not all(hasattr(inner, n) for n in needed):
        return "not a decoder-only model of the expected layout"
    for layer in inner.layers:
        attn = layer.self_attn
        if hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None):
            return "attention with query/key norms or a sliding window"
    return ""
