"""Per-layer KV caches of decode steps, grown in place."""

from __future__ import annotations

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H, T, D]

# Decode steps between reallocations of a sequence's KV buffer.
KV_SLACK = 256


def append_kv(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """t [B, H, T, D] + new [B, H, n, D] -> [B, H, T + n, D].

    transformers' DynamicCache concatenates, copying the whole cache of every layer at
    every step (twice when the cache is rebuilt from tensors): measured on the 0.5B int4
    at a 600-token context, a fifth of the decode step. Here the KV lives in a buffer
    with room for KV_SLACK more positions; while `t` is exactly the filled part of such a
    buffer, the new positions are written in place and a longer view is returned. Any
    other tensor (a prefill's, a merged batch's, a cached prefix) is copied once into a
    new buffer, so no tensor this function did not allocate is ever written to.

    The view names its buffer in an attribute: under torch.inference_mode() (where the
    engine runs) views have no `_base`, so that cannot tell.
    """
    length, extra = t.shape[2], new.shape[2]
    buf: torch.Tensor | None = getattr(t, "_ragqa_buffer", None)
    if (
        buf is not None
        and buf._ragqa_filled == length  # type: ignore[attr-defined]
        and t.data_ptr() == buf.data_ptr()
        and t.stride() == buf.stride()
        and buf.shape[:2] == t.shape[:2]
        and buf.shape[2] >= length + extra
    ):
        buf[:, :, length : length + extra] = new
    else:
        b, h, _, d = t.shape
        buf = torch.empty(b, h, length + extra + KV_SLACK, d, dtype=t.dtype, device=t.device)
        buf[:, :, :length] = t
        buf[:, :, length : length + extra] = new
    buf._ragqa_filled = length + extra  # type: ignore[attr-defined]
    view = buf[:, :, : length + extra]
    view._ragqa_buffer = buf  # type: ignore[attr-defined]
    return view
