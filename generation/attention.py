"""Attention for single-token decode steps on the CPU.

At q_len = 1, torch's CPU flash-attention kernel (what SDPA picks) took ~2 ms per layer
for a 600-token context on the 0.5B model, a third of an int4 decode step: it is built
for blocks of queries. One query per head is two small matrix products; grouping the
query heads by the key/value head they share avoids copying K and V per query head.
Those matmuls still took 181 us per layer of the 1.5B at a 640-token context (86 us with
ragqa's kernel, csrc/decode_attention.cpp; 125 vs 52 us for the 0.5B's heads), so
float32 and bfloat16 models use the kernel where it is built (it reads a bfloat16 cache
as it is, where the matmuls below copy it to float32 every step); float16 keeps them.
Prefill (q_len > 1) and non-CPU devices keep transformers' SDPA path.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from generation import qmatmul

NAME = "ragqa_cpu_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, q, D], key/value [B, Hkv, T, D] -> ([B, q, Hq, D], None)."""
    if query.shape[2] != 1 or query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    if _kernel_applies(query, key, value, attention_mask):
        mask = None
        if attention_mask is not None:  # [B, 1, q, T] -> the last query's row, [B, T]
            mask = attention_mask[:, 0, -1, :].expand(b, key.shape[2])
        out = qmatmul.decode_attention(query.reshape(b, hq, d).float(), key, value, mask, scale)
        return out.view(b, 1, hq, d).to(query.dtype), None
    # Query head i reads key/value head i // (hq // hkv), as transformers' repeat_kv does.
    q = query.reshape(b, hkv, hq // hkv, d).float()  # [B, Hkv, G, D]
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, :]  # [B, 1, 1, T]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float())  # [B, Hkv, G, D]
    return out.reshape(b, hq, 1, d).transpose(1, 2).to(query.dtype).contiguous(), None


def _kernel_applies(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> bool:
    return (
        qmatmul.loaded()
        and query.dtype == key.dtype == value.dtype
        and key.dtype in (torch.float32, torch.bfloat16)
        and query.shape[-1] % 8 == 0
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and (attention_mask is None or attention_mask.dtype == torch.bool)
    )


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model: torch.nn.Module) -> bool:
    """Switch a CPU model from SDPA to `decode_attention`; False when it does not apply."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    qmatmul.load()  # the float32 attention kernel, built once per machine
    model.set_attn_implementation(NAME)
    return True
