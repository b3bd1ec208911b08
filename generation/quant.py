"""Weight-only int8 / int4 linear layers for CPU decoding: the packs and the layer.

Decoding on a CPU is bound by the bytes of weights read per token, so decode steps use
packed weights: int8 per block of 32 inputs or int4 per group, multiplied by ragqa's
int8-activation kernels (`qmatmul.py`) or, where those cannot be built, torch's. Those
kernels are built for a few rows at a time and lose to a float matmul on a long prefill,
so a call with more than `prefill_rows` rows multiplies float weights, expands the packs
into a shared scratch, or runs on the integer GEMM (`PREFILL_WEIGHTS`; which one, and
the replacement of a model's layers and the cache of packs, are `quant_load.py`'s).
Stacking the projections that share an input is `siblings.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from generation import qmatmul

if TYPE_CHECKING:  # siblings.py builds on QuantizedLinear
    from generation.siblings import SiblingGroup

# "gguf": int4 where the model's GGUF stores 4-bit blocks, int8 elsewhere (gguf_packs.py).
MODES = ("none", "int8", "int4", "gguf")
PREFILL_WEIGHTS = ("auto", "float", "quantized", "integer")
GGUF_GROUP = 32  # the int4 group of gguf packs: Q4_K's sub-block, Q4_1's block
# Packs an int8 layer may carry beside its decode packs for the integer prefill GEMM: a
# GGUF's Q6_K blocks (`gguf_packs.unpack_q6_k`).
GEMM_PACKS = ("q6", "q6_scales", "q6_d")
# A GGUF's Q4_K scales for the integer prefill GEMM (`qmatmul.q4k_gemm`), beside the int4
# packs' nibbles.
Q4K_PACKS = ("q4k_codes", "q4k_dd")
# What a setting may ask for: a mode, or "auto" for the one `resolve_mode` picks.
SETTING_MODES = ("auto", *MODES)
# What one layer holds: "q6k" is a GGUF's Q6_K blocks as they are, in "gguf" mode only.
LAYER_MODES = ("int8", "int4", "q6k")


def resolve_mode(mode: str, device: torch.device, has_gguf: bool = False) -> str:
    """The mode to load with. "auto", on a CPU where ragqa's kernels build: gguf when the
    model's GGUF is at hand (`has_gguf`), else int8; elsewhere none.

    gguf because it decodes fastest and its weights are the model's own where int8 rounds
    them (gguf_packs.py); it kept the eval's answers as int8 did, where int4 did not
    (README, "Measured results"). none where the kernels are missing, because torch's int8
    kernel decodes slower than float weights on CPUs without AVX-512, and on a GPU, where
    the packed kernels do not run.
    """
    if mode not in SETTING_MODES:
        raise ValueError(f"quantization must be one of {SETTING_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type == "cpu" and qmatmul.load():
        return "gguf" if has_gguf else "int8"
    return "none"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], scales [N]) with symmetric per-channel scales.

    The layout of torch's weight-only int8 kernel, used where ragqa's cannot be built.
    """
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scales[:, None]), -128, 127).to(torch.int8)
    return q, scales


def quantize_int8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], scales [N, K/32] float16), symmetric per block of 32.

    The scale is rounded to float16 before dividing, so q * scale is exactly what the
    kernel multiplies by.
    """
    n, k = weight.shape
    if k % qmatmul.BLOCK:
        raise ValueError(f"int8 blocks need in_features divisible by {qmatmul.BLOCK}, got {k}")
    w = weight.float().reshape(n, k // qmatmul.BLOCK, qmatmul.BLOCK)
    # float16's smallest subnormal keeps an all-zero block's scale from rounding to 0.
    scales = (w.abs().amax(-1, keepdim=True) / 127).clamp(min=2**-24).half()
    q = torch.clamp(torch.round(w / scales.float()), -127, 127).to(torch.int8)
    return q.reshape(n, k), scales.squeeze(-1)


def dequantize_int8_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    w = q.reshape(n, k // qmatmul.BLOCK, qmatmul.BLOCK).float() * scales.float().unsqueeze(-1)
    return w.reshape(n, k)


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


def quantize_by_rows(
    weight: torch.Tensor,
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scale_dim: int = 0,
    chunk_values: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(weight)`, computed `chunk_values // K` rows at a time: the same values.

    The quantizers above make several float32 temporaries of the whole weight; for the
    1.5B's tied vocabulary projection [151936, 1536] that is 0.93 GB each, which set the
    peak memory of a first load. Rows are quantized independently, so chunks change
    nothing. `scale_dim`: the dimension of the scales that follows the weight's rows.
    """
    rows = max(1, chunk_values // weight.shape[1])
    if weight.shape[0] <= rows:
        return quantize(weight)
    parts = [quantize(weight[start : start + rows]) for start in range(0, weight.shape[0], rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts], dim=scale_dim)


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    scales = sz[..., 0].transpose(0, 1).unsqueeze(-1)  # [N, K/g, 1]
    zeros = sz[..., 1].transpose(0, 1).unsqueeze(-1)
    w = (q.reshape(n, k // group_size, group_size).float() - 8) * scales + zeros
    return w.reshape(n, k)


def prefill_layout(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    """A float weight [N, K] with the same values, stored column-major (a [K, N] tensor's .t()).

    A narrower weight (bfloat16 as loaded) is transposed first and widened to `dtype`
    after, so the copy on the way costs 2 bytes a weight instead of 4.

    F.linear(x, W) computes x @ W.T: with W stored row-major, MKL's sgemm reads B
    transposed; stored this way, it reads B as it lies. On a Zen 2 CPU (2 threads, fp32,
    623 rows: `bench/quant_kernels.py --model 0.5b --rows 623`) the 0.5B's shapes
    1152x896, 896x896, 4864x896 and 896x4864 took 0.75x, 0.91x, 0.94x and 0.96x of the
    time, and the whole 623-token prefill of the 0.5B int8 4.6 % less (3.80 s -> 3.63 s,
    median of 5 alternated runs of a throwaway script), with bit-identical
    logits. The 1.5B's shapes gained 2-4 % (`--model 1.5b`), within the noise of a 5-run
    A/B of its prefill. The copy makes loading the 1.5B ~4.5 s longer (3.6-5.2 s -> 8.5-9.5
    s, int8 from the cache). Decode steps do not read this weight (they use the packed one).
    """
    return nn.Parameter(weight.detach().t().contiguous().to(dtype).t(), requires_grad=False)


class PrefillScratch:
    """One float buffer that the layers of a model expand their packed weights into.

    Layers run one after another on the generator's thread, so one buffer of the largest
    layer's size serves them all; a tensor allocated per call would be mapped and
    page-faulted anew each time (the 1.5B model's gate or up projection is 55 MB). The
    vocabulary projection never expands into it: it multiplies every call on the kernel
    (`quantize_model`), and would grow the buffer to 0.93 GB on the 1.5B.
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """A contiguous [rows, cols] float32 view of the buffer (grown when too small)."""
        if self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols)
        return self.buffer[: rows * cols].view(rows, cols)


def expand_packed(
    qweight: torch.Tensor, scales: torch.Tensor, mode: str, group_size: int, out: torch.Tensor
) -> torch.Tensor:
    """The float weight [N, K] that the kernels' packed weights stand for, in `out`."""
    if mode == "int8":
        qmatmul.int8_dequantize(qweight, scales, out)
    elif mode == "q6k":
        qmatmul.int6_dequantize(qweight, scales, out)
    else:
        qmatmul.int4_dequantize(qweight, scales, group_size, out)
    return out


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
        dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: what the model computes in, when `dense` still holds narrower weights.
        Mode "q6k" takes a GGUF's Q6_K blocks as `packed` (`gguf_packs.split_q6_k`) and
        needs ragqa's kernels."""
        super().__init__()
        if mode not in LAYER_MODES:
            raise ValueError(f"mode must be one of {LAYER_MODES}, got {mode!r}")
        if mode == "q6k" and packed is None:
            raise ValueError("mode q6k takes its packs from a GGUF; none were given")
        self.mode = mode
        self.kernel = False
        self.group_size = group_size
        self.prefill_rows = prefill_rows
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.siblings: SiblingGroup | None = None  # set by `fuse_siblings`
        # Float, for prefill (shared when tied to embeddings); None when the layer expands
        # its packed weights into `scratch` instead (prefill_weights "quantized"), or,
        # without a scratch either, multiplies every call's rows on the packs.
        self.weight: nn.Parameter | None = dense.weight
        self.scratch: PrefillScratch | None = None
        self.gemm = False  # long calls on the integer GEMM (`prefill_on_gemm`)
        # An int8 layer's 6-bit blocks for that GEMM (GEMM_PACKS), where it has them.
        self.six_bit: tuple[torch.Tensor, ...] | None = None
        # An int4 layer's Q4_K scales for the AVX2 GEMM (Q4K_PACKS), where its GGUF has them.
        self.q4k: tuple[torch.Tensor, ...] | None = None
        self.bias = dense.bias
        dtype = dtype or dense.weight.dtype
        if packed is None:
            packed = self.quantize(dense.weight.detach(), mode, group_size)
        if use_kernel is None:
            if mode == "int8":
                fits = packed["scales"].dim() == 2  # per block (see `quantize`)
            elif mode == "q6k":
                fits = qmatmul.supports_int6(self.in_features)
            else:
                fits = qmatmul.supports_int4(self.in_features, group_size)
            use_kernel = fits and qmatmul.load()
        if mode == "q6k" and not use_kernel:
            raise ValueError("mode q6k needs ragqa's kernels (AVX2 and a C++ compiler)")
        # ragqa's int8-activation kernels where they build, else torch's weight-only ones
        # (an 8960x1536 layer, one row, fp32 on an AVX2 CPU: int4 0.38 ms vs 13.4 ms for
        # torch's, which is slower than the float matmul's 2.7 ms; bench/quant_kernels.py).
        self.kernel = use_kernel
        if mode in ("int8", "q6k") and use_kernel:
            scales = packed["scales"] if mode == "q6k" else packed["scales"].half()
            self.register_buffer("qweight", packed["qweight"], persistent=False)
            self.register_buffer("scales", scales, persistent=False)
            if all(key in packed for key in GEMM_PACKS):
                self.six_bit = tuple(packed[key] for key in GEMM_PACKS)
        elif mode == "int8":
            # torch's kernel takes one scale per output row: quantize the float weight
            # (kept for prefill anyway) that way, whatever the packed form holds.
            q, scales = quantize_by_rows(dense.weight.detach(), quantize_int8)
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scales", scales.to(dtype), persistent=False)
        elif use_kernel:
            q = packed["qweight"]
            # [N, K/2]: nibbles as the kernel reads them, as the cache stores them
            qs = q.contiguous() if self._nibbles(q) else qmatmul.pack_nibbles(q)
            self.register_buffer("qweight", qs, persistent=False)
            self.register_buffer("scales", qmatmul.int4_scales(packed["scales"]), persistent=False)
            if all(key in packed for key in Q4K_PACKS):
                self.q4k = tuple(packed[key] for key in Q4K_PACKS)
        else:
            q = packed["qweight"]
            q = (qmatmul.unpack_nibbles(q) if self._nibbles(q) else q).to(torch.int32)
            self.register_buffer(
                "qweight",
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                persistent=False,
            )
            self.register_buffer("scales", packed["scales"].to(dtype), persistent=False)

    def _nibbles(self, q: torch.Tensor) -> bool:
        """Whether int4 values q come two to a byte ([N, K/2]) rather than one ([N, K])."""
        return q.shape[1] * 2 == self.in_features

    def cache_form(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a cache of packs stores for this layer, given what it was built from:
        int4 values two to a byte where the kernel reads them so (half the bytes of one
        value a byte, and a cached load takes them as they are), else `packed` as it is."""
        if self.mode == "int4" and self.kernel:
            q4k = {key: packed[key] for key in Q4K_PACKS if key in packed}
            return {"qweight": self.qweight, "scales": packed["scales"], **q4k}
        return packed

    def prefill_weight(self) -> torch.Tensor:
        """The float weight [N, K] a long call multiplies: kept, or expanded into scratch."""
        if self.weight is not None:
            return self.weight
        assert self.scratch is not None  # `drop_float_weight` set it
        w = self.scratch.take(self.out_features, self.in_features)
        return expand_packed(self.qweight, self.scales, self.mode, self.group_size, w)

    def drop_float_weight(self, scratch: PrefillScratch | None) -> None:
        """Free the float weight: long calls then expand the packs into `scratch`, or,
        with None, run on the kernel whatever their rows (a layer that sees few)."""
        if not self.kernel:
            raise ValueError("prefill from packed weights needs ragqa's kernels")
        self.weight = None
        self.scratch = scratch

    def prefill_on_gemm(self) -> bool:
        """Move long calls onto the integer GEMM (prefill_weights "integer") and free the
        float weight, where the packs allow it, on ragqa's kernels: int4, int8 whose values
        all lie in -16..15 (a GGUF's Q5_0 blocks), both read as the decode steps read them,
        or int8 with 6-bit blocks beside them (`six_bit`). Returns whether they did (else
        nothing changes)."""
        if not (
            self.kernel
            and (
                self.mode == "int4"
                or self.six_bit is not None
                or (self.mode == "int8" and qmatmul.narrow_int8(self.qweight))
            )
        ):
            return False
        self.weight = None
        self.scratch = None
        self.gemm = True
        return True

    @staticmethod
    def quantize(weight: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
        if mode == "int8":
            # ragqa's kernel reads scales per block of 32; where blocks do not fit, the
            # per-row layout of torch's kernel.
            if qmatmul.supports_int8(weight.shape[1]):
                q, scales = quantize_by_rows(weight, quantize_int8_blocks)
            else:
                q, scales = quantize_by_rows(weight, quantize_int8)
        else:
            if weight.shape[1] % group_size:
                raise ValueError(
                    f"int4 needs in_features divisible by group_size {group_size}, "
                    f"got {weight.shape[1]}"
                )
            q, scales = quantize_by_rows(weight, lambda w: quantize_int4(w, group_size), 1)
        return {"qweight": q.contiguous(), "scales": scales.contiguous()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        rows = x.numel() // self.in_features
        long_gemm = rows > self.prefill_rows and self.gemm
        has_float = self.weight is not None or self.scratch is not None
        if rows > self.prefill_rows and has_float:
            # Members of a sibling group too: stacked, their outputs would be strided
            # slices, which made the elementwise ops after them (silu, mul, the bias add)
            # twice as slow and cost more than one GEMM over the stack saves.
            weight = self.prefill_weight()
            if weight.dtype == x.dtype:
                return F.linear(x, weight, self.bias)
            # bfloat16 weights in a float32 model (`quantize_model`'s prefill_dtype): the
            # GEMM sums in float32 and rounds its output to bfloat16. Or a bfloat16 model
            # whose packs were expanded into the float32 scratch.
            y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
            return y if self.bias is None else y + self.bias
        # A long call on the GEMM skips the stack too, for the reason given above.
        if self.siblings is not None and not long_gemm:
            return self.siblings.output(x, self).reshape(*x.shape[:-1], self.out_features)
        flat = x.reshape(rows, self.in_features)
        if long_gemm and self.six_bit is not None:
            y = qmatmul.int6_gemm(flat, *self.six_bit).to(x.dtype)
        elif long_gemm and self.mode == "int8":
            y = qmatmul.int8_gemm(flat, self.qweight, self.scales).to(x.dtype)
        elif long_gemm and self.q4k is not None and qmatmul.kernel_isa() == "avx2":
            # On AVX-512 VNNI the int4 GEMM's wide tiles are the faster (see q4k_gemm.cpp).
            y = qmatmul.q4k_gemm(flat, self.qweight, *self.q4k).to(x.dtype)
        elif long_gemm:
            y = qmatmul.int4_gemm(flat, self.qweight, self.scales, self.group_size).to(x.dtype)
        elif self.kernel and self.mode == "int8":
            y = qmatmul.int8_linear(flat, self.qweight, self.scales).to(x.dtype)
        elif self.kernel and self.mode == "q6k":
            y = qmatmul.int6_linear(flat, self.qweight, self.scales).to(x.dtype)
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
