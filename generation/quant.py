"""Weight-only int8 / int4 linear layers for CPU decoding, with an on-disk cache.

Decoding on a CPU is bound by the bytes of weights read per token, so decode steps use
packed weights: int8 per output channel or int4 per group, multiplied by ragqa's
int8-activation kernels (`qmatmul.py`) or, where those cannot be built, torch's. Those
kernels are built for a few rows at a time and lose to a float matmul on a long prefill,
so each layer also keeps its float weight and uses it when a call has more than
`prefill_rows` rows. That costs memory (float + int copy), which this machine has; it
keeps prefill exactly as fast as without quantization.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from generation import qmatmul

logger = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], scales [N]) with symmetric per-channel scales."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scales[:, None]), -128, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (uint8 values 0..15 [N, K], scales_and_zeros [K/g, N, 2]).

    Asymmetric per group: w ≈ (q - 8) * scale + zero, the layout torch's CPU kernel reads.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = lo + scales * 8
    q = torch.clamp(torch.round((w - lo) / scales), 0, 15).to(torch.uint8).reshape(n, k)
    sz = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    scales = sz[..., 0].transpose(0, 1).unsqueeze(-1)  # [N, K/g, 1]
    zeros = sz[..., 1].transpose(0, 1).unsqueeze(-1)
    w = (q.reshape(n, k // group_size, group_size).float() - 8) * scales + zeros
    return w.reshape(n, k)


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        dense: nn.Linear,
        mode: str,
        *,
        group_size: int = 64,
        prefill_rows: int = 16,
        packed: dict[str, torch.Tensor] | None = None,
        use_kernel: bool | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"mode must be int8 or int4, got {mode!r}")
        self.mode = mode
        self.kernel = False
        self.group_size = group_size
        self.prefill_rows = prefill_rows
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.weight = dense.weight  # bf16, for prefill (shared when tied to embeddings)
        self.bias = dense.bias
        dtype = dense.weight.dtype
        if packed is None:
            packed = self.quantize(dense.weight.detach(), mode, group_size)
        if use_kernel is None:
            fits = (
                qmatmul.supports_int8(self.in_features)
                if mode == "int8"
                else qmatmul.supports_int4(self.in_features, group_size)
            )
            use_kernel = fits and qmatmul.load()
        # ragqa's int8-activation kernels where they build, else torch's weight-only ones
        # (an 8960x1536 layer, one row, fp32 on an AVX2 CPU: int4 0.38 ms vs 13.4 ms for
        # torch's, which is slower than the float matmul's 2.7 ms; bench/quant_kernels.py).
        self.kernel = use_kernel
        if mode == "int8":
            scale_dtype = torch.float32 if use_kernel else dtype
            self.register_buffer("qweight", packed["qweight"], persistent=False)
            self.register_buffer("scales", packed["scales"].to(scale_dtype), persistent=False)
        elif use_kernel:
            qs, sm = qmatmul.pack_int4(packed["qweight"], packed["scales"])
            self.register_buffer("qweight", qs, persistent=False)
            self.register_buffer("scales", sm, persistent=False)
        else:
            q = packed["qweight"].to(torch.int32)
            self.register_buffer(
                "qweight",
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                persistent=False,
            )
            self.register_buffer("scales", packed["scales"].to(dtype), persistent=False)

    @staticmethod
    def quantize(weight: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
        if mode == "int8":
            q, scales = quantize_int8(weight)
        else:
            if weight.shape[1] % group_size:
                raise ValueError(
                    f"int4 needs in_features divisible by group_size {group_size}, "
                    f"got {weight.shape[1]}"
                )
            q, scales = quantize_int4(weight, group_size)
        return {"qweight": q.contiguous(), "scales": scales.contiguous()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        rows = x.numel() // self.in_features
        if rows > self.prefill_rows:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if self.kernel and self.mode == "int8":
            y = qmatmul.int8_linear(flat, self.qweight, self.scales).to(x.dtype)
        elif self.kernel:
            y = qmatmul.int4_linear(flat, self.qweight, self.scales, self.group_size).to(x.dtype)
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.qweight, self.group_size, self.scales
            )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]


def cache_path(folder: Path, mode: str, group_size: int) -> Path:
    suffix = f"-g{group_size}" if mode == "int4" else ""
    return folder / f"ragqa-quant-{mode}{suffix}.safetensors"


def quantize_model(
    model: nn.Module,
    mode: str,
    *,
    group_size: int = 64,
    cache: Path | None = None,
    prefill_rows: int = 16,
) -> dict[str, object]:
    """Replace every nn.Linear (lm_head included) in place; returns what was done.

    With `cache`, quantized weights are read from that file when present (no
    re-quantization) and written there the first time.
    """
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return {"mode": "none"}
    start = time.perf_counter()
    stored: dict[str, torch.Tensor] = {}
    from_cache = cache is not None and cache.exists()
    if from_cache:
        stored = load_file(str(cache))
    to_save: dict[str, torch.Tensor] = {}
    for name, linear in _targets(model):
        packed = None
        if from_cache and f"{name}.qweight" in stored:
            packed = {"qweight": stored[f"{name}.qweight"], "scales": stored[f"{name}.scales"]}
        else:
            packed = QuantizedLinear.quantize(linear.weight.detach(), mode, group_size)
            to_save[f"{name}.qweight"] = packed["qweight"]
            to_save[f"{name}.scales"] = packed["scales"]
        quantized = QuantizedLinear(
            linear, mode, group_size=group_size, prefill_rows=prefill_rows, packed=packed
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized)
    if cache is not None and to_save:
        tmp = cache.with_name(cache.name + ".tmp")
        save_file({**stored, **to_save}, str(tmp))
        tmp.replace(cache)
    seconds = time.perf_counter() - start
    logger.info(
        "quantized to %s in %.1f s (%s)", mode, seconds, "cached" if from_cache else "computed"
    )
    return {"mode": mode, "group_size": group_size, "seconds": seconds, "from_cache": from_cache}
