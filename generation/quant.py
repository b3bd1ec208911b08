"""Weight-only int8 / int4 linear layers for CPU decoding, with an on-disk cache.

Decoding on a CPU is bound by the bytes of weights read per token, so decode steps use
packed weights: int8 per block of 32 inputs or int4 per group, multiplied by ragqa's
int8-activation kernels (`qmatmul.py`) or, where those cannot be built, torch's. Those
kernels are built for a few rows at a time and lose to a float matmul on a long prefill,
so a call with more than `prefill_rows` rows multiplies float weights. Where they come
from is `prefill_weights`:
- "float": each layer keeps its float weight. The fastest prefill, for 4 bytes a weight
  on top of the packed copy (the 1.5B model: 11.9-12.4 GB peak RSS in the benchmark), or
  2 where the prefill multiplies in bfloat16 (`device.split_dtypes`).
- "quantized": each call expands the packed weights into one float scratch shared by the
  layers (`PrefillScratch`). Memory is the packed copy's plus the largest layer's floats;
  each long call pays one pass that writes a layer's floats (figures in README), and the
  prefill reads weights rounded to int8/int4 (the activations stay exact).
- "integer": int4 layers, and int8 ones whose values lie in -16..15 (a GGUF's Q5_0
  blocks), multiply a long call's rows on an int8-activation GEMM (`qmatmul.int4_gemm`,
  `int8_gemm`), which lays their packs out in panels as it goes: no float copy, and on
  an AVX2 CPU about half the time of the fp32 GEMM (figures in README). So do int8
  layers whose GGUF holds Q6_K blocks, on those blocks (`GEMM_PACKS`, `qmatmul.int6_gemm`).
  The activations are rounded to int8 per block of 32, as in llama.cpp's prefill. Other
  int8 layers keep float copies, as with "float".
- "auto": "integer" where that GEMM would run most of the prefill and the float one would
  be float32 (`Engine.load` decides); otherwise "float" when the float copies would take
  at most half of the memory the system has available, else "quantized"
  (`choose_prefill_weights`; `Engine.load` asks before loading the model,
  `quantize_model` when it is called).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from generation import qmatmul
from generation.memory import available_memory, release_mapped_pages, return_freed_memory

logger = logging.getLogger(__name__)

# "gguf": int4 where the model's GGUF stores 4-bit blocks, int8 elsewhere (gguf_packs.py).
MODES = ("none", "int8", "int4", "gguf")
PREFILL_WEIGHTS = ("auto", "float", "quantized", "integer")
GGUF_GROUP = 32  # the int4 group of gguf packs: Q4_K's sub-block, Q4_1's block
# Packs an int8 layer may carry beside its decode packs for the integer prefill GEMM: a
# GGUF's Q6_K blocks (`gguf_packs.unpack_q6_k`).
GEMM_PACKS = ("q6", "q6_scales", "q6_d")
# What a setting may ask for: a mode, or "auto" for the one `resolve_mode` picks.
SETTING_MODES = ("auto", *MODES)


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
    """The float weight [N, K] that the kernels' packed int8/int4 weights stand for, in `out`."""
    if mode == "int8":
        qmatmul.int8_dequantize(qweight, scales, out)
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
        """`dtype`: what the model computes in, when `dense` still holds narrower weights."""
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"mode must be int8 or int4, got {mode!r}")
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
        self.bias = dense.bias
        dtype = dtype or dense.weight.dtype
        if packed is None:
            packed = self.quantize(dense.weight.detach(), mode, group_size)
        if use_kernel is None:
            fits = (
                packed["scales"].dim() == 2  # per block (see `quantize`)
                if mode == "int8"
                else qmatmul.supports_int4(self.in_features, group_size)
            )
            use_kernel = fits and qmatmul.load()
        # ragqa's int8-activation kernels where they build, else torch's weight-only ones
        # (an 8960x1536 layer, one row, fp32 on an AVX2 CPU: int4 0.38 ms vs 13.4 ms for
        # torch's, which is slower than the float matmul's 2.7 ms; bench/quant_kernels.py).
        self.kernel = use_kernel
        if mode == "int8" and use_kernel:
            self.register_buffer("qweight", packed["qweight"], persistent=False)
            self.register_buffer("scales", packed["scales"].half(), persistent=False)
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
            return {"qweight": self.qweight, "scales": packed["scales"]}
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
                self.mode == "int4" or self.six_bit is not None or qmatmul.narrow_int8(self.qweight)
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
        elif long_gemm:
            y = qmatmul.int4_gemm(flat, self.qweight, self.scales, self.group_size).to(x.dtype)
        elif self.kernel and self.mode == "int8":
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


class SiblingGroup:
    """Projections that read the same input, computed by one kernel call on decode steps.

    A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and
    gate_proj and up_proj on the same input. Each separate call quantizes the activations
    again, starts the thread pool again and pays Python's per-module cost; on the 1.5B
    model that is 7 kernel calls per layer where 4 suffice. Here the members' packed
    weights are stacked into one matrix (rows are quantized independently, so stacking
    changes no value); the first member called with an input computes every member's
    output, and the others take their slice when they are called with that same tensor
    object. The group holds a reference to that input until every member has taken its
    part, so the identity check cannot be fooled by a freed and reused tensor. A member
    called with any other tensor computes afresh, so an unexpected call order is only
    slower, never wrong. Inputs are not modified in place between the sibling calls (the
    models' own forward reads them once each), which the identity check relies on.
    """

    def __init__(self, members: list[QuantizedLinear]) -> None:
        first = members[0]
        self.mode, self.group_size = first.mode, first.group_size
        self.in_features = first.in_features
        self.offsets: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            self.offsets[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self.qweight = torch.cat([m.qweight for m in members])
        self.scales = torch.cat([m.scales for m in members])
        biases = [m.bias for m in members]
        given = [b for b in biases if b is not None]
        self.bias = (
            None
            if not given
            else torch.cat(
                [
                    b.detach() if b is not None else given[0].new_zeros(m.out_features)
                    for b, m in zip(biases, members, strict=True)
                ]
            )
        )
        self.members = members
        for m in members:
            m.siblings = self
        self.point_members()
        self.size = len(members)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._left = 0

    def point_members(self) -> None:
        """Give the members views into the stacked weights (again, once those have moved)."""
        for m in self.members:
            lo, hi = self.offsets[id(m)]
            m.qweight, m.scales = self.qweight[lo:hi], self.scales[lo:hi]

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> every member's output side by side, [rows, sum of the members' N]."""
        flat = x.reshape(-1, self.in_features)
        if self.mode == "int8":
            y = qmatmul.int8_linear(flat, self.qweight, self.scales)
        else:
            y = qmatmul.int4_linear(flat, self.qweight, self.scales, self.group_size)
        # The same arithmetic as an unfused member: cast, then add the bias.
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def stacked(self, members: list[QuantizedLinear]) -> bool:
        """Whether `members` are exactly this group's, stacked in this order."""
        # `offsets` was filled member by member with adjacent ranges.
        return [id(m) for m in members] == list(self.offsets)

    def output(self, x: torch.Tensor, member: QuantizedLinear) -> torch.Tensor:
        """x [..., K] -> this member's part of the stacked output, [rows, member's N]."""
        if x is not self._input or self._left == 0:
            self._input, self._output, self._left = x, self.compute(x), self.size
        assert self._output is not None
        lo, hi = self.offsets[id(member)]
        part = self._output[:, lo:hi]
        self._left -= 1
        if self._left == 0:
            self._input = self._output = None
        return part


# Attribute names of projections that share their input, per module, in the Llama/Qwen2
# family of decoder layers (attention and MLP).
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """Group the kernel-backed projections that share an input; returns how many groups."""
    return sum(fuse_module(module) for module in model.modules())


def fuse_module(module: nn.Module) -> int:
    """Group `module`'s own sibling projections (`SIBLING_NAMES`); returns how many groups."""
    groups = 0
    for names in SIBLING_NAMES:
        members = [getattr(module, n, None) for n in names]
        if not all(
            isinstance(m, QuantizedLinear) and m.kernel and m.siblings is None for m in members
        ):
            continue
        first = members[0]
        if any(
            m.mode != first.mode
            or m.group_size != first.group_size
            or m.in_features != first.in_features
            for m in members
        ):
            continue
        SiblingGroup(members)  # type: ignore[arg-type]
        groups += 1
    return groups


def _widen(module: nn.Module, dtype: torch.dtype, keep: set[int] | None = None) -> None:
    """Cast `module`'s own float parameters to `dtype` in place (ties survive: same objects),
    except those whose id is in `keep`."""
    for param in module.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype and id(param) not in (keep or ()):
            param.data = param.data.to(dtype)


def _vocabulary_projection(model: nn.Module) -> nn.Module | None:
    """The layer that turns hidden states into logits (lm_head), where the model says."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]


def cache_path(folder: Path, mode: str, group_size: int) -> Path:
    # int8 is "-b32": its scales went from one per row to one per block of 32, and a
    # cache of the old layout must not be read as the new one.
    # gguf is "-q6k": it holds Q6_K blocks for the integer GEMM (GEMM_PACKS), which a cache
    # written before would lack, leaving those layers on float copies.
    suffix = {"int4": f"-g{group_size}", "gguf": "-q6k"}.get(mode, f"-b{qmatmul.BLOCK}")
    return folder / f"ragqa-quant-{mode}{suffix}.safetensors"


# Caches that a cache of the same name replaces, written by an earlier ragqa: removed
# once the new one is written (the 1.5B's gguf cache is 1.3 GB).
SUPERSEDED = {"ragqa-quant-gguf-q6k.safetensors": ("ragqa-quant-gguf.safetensors",)}

_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SOURCE_KEY = "ragqa_source"  # the cache's metadata entry naming the files it was packed from


def source_fingerprint(files: list[Path]) -> str:
    """Name, size and modification time of each file a cache is packed from.

    A cache whose fingerprint differs was packed from other weights (a model provisioned
    anew into the same folder, another GGUF beside it) and is not read. Sizes and times,
    not a hash of the contents: hashing the 1.5B's 3.1 GB checkpoint would add seconds to
    every load, which the cache is there to save; a copy of the folder (new times) only
    costs one quantization.
    """
    parts = []
    for file in sorted(files):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, without ragqa's caches beside them."""
    return [
        file
        for file in sorted(Path(folder).glob("*.safetensors"))
        if not file.name.startswith("ragqa-quant-")
    ]


def _cache_complete(cache: Path | None, names: list[str], source: str | None) -> bool:
    """Whether `cache` holds the packs of every layer in `names`, packed from `source`
    (`source_fingerprint`; None: not checked), else quantize afresh.

    A file without every layer's packs (another model's), one packed from other files
    (or written before caches named their source) or one that cannot be read is written
    anew rather than trusted.
    """
    if cache is None or not cache.exists():
        return False
    try:
        with safe_open(str(cache), framework="pt") as f:
            keys = set(f.keys())
            written_from = (f.metadata() or {}).get(SOURCE_KEY)
    except Exception as exc:  # safetensors raises its own error type for a bad header
        logger.warning("quantized cache %s unreadable (%s); quantizing afresh", cache, exc)
        return False
    if source is not None and written_from != source:
        logger.warning(
            "quantized cache %s was packed from %s, not from %s; quantizing afresh",
            cache,
            written_from or "files it does not name",
            source,
        )
        return False
    if all(f"{n}.{key}" in keys for n in names for key in ("qweight", "scales")):
        return True
    logger.warning("quantized cache %s lacks some layers; quantizing afresh", cache)
    return False


def checkpoint_weights(folder: Path) -> tuple[torch.dtype | None, int]:
    """From a safetensors checkpoint's headers: the one float dtype all its tensors are
    stored in (None when mixed or unknown), and how many values its matrices other than
    the embeddings and lm_head hold (what `quantize_model` would keep float copies of)."""
    found: set[str] = set()
    matrix_values = 0
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
            for name in names:
                tensor = f.get_slice(name)
                found.add(tensor.get_dtype())
                shape = tensor.get_shape()
                # Embeddings and the vocabulary projection keep no float copy.
                if len(shape) == 2 and "embed" not in name and not name.startswith("lm_head."):
                    matrix_values += shape[0] * shape[1]
    dtype = _STORED_DTYPES.get(found.pop()) if len(found) == 1 else None
    return dtype, matrix_values


def choose_prefill_weights(
    asked: str, float_bytes: int, available: int | None, *, integer: bool = False
) -> str:
    """ "float", "quantized" or "integer" for a prefill_weights setting (module docstring).

    `integer`: whether the integer GEMM would run most of the prefill (int4 or gguf packs
    on ragqa's kernels) and the floats would be float32 (no faster bfloat16 GEMM on this
    CPU); "auto" then takes it, faster than either float path and without their memory.

    `float_bytes` is what the float copies take, `available` what the system has free
    (`Engine.load` asks before loading the model). "auto" keeps the copies when they take
    at most half of it: a model with its copies peaks at about 1.8 times their size while
    loading (1.5B int8: 9.65 GB for 5.2 GB of copies), which leaves some room for the KV cache, the
    embedder, the index and other programs. Where the available memory is unknown it keeps
    them (the faster prefill).
    """
    if asked not in PREFILL_WEIGHTS:
        raise ValueError(f"prefill_weights must be one of {PREFILL_WEIGHTS}, got {asked!r}")
    if asked != "auto":
        return asked
    if integer:
        return "integer"
    if available is None or float_bytes <= available // 2:
        return "float"
    return "quantized"


def _drop_weight(linear: nn.Linear) -> None:
    """Let a replaced float weight go now, not when the loop over the layers ends.

    Holding the float originals kept two copies of the weights (1.5B: peak RSS 10.7 ->
    13.2 GB); a checkpoint loaded as stored is a mapped file whose pages this layer's
    quantization read, which stay resident until the last weight of it dies (1.5B first
    load: 3.1 GB of them).
    """
    release_mapped_pages(linear.weight)
    linear.weight = None  # type: ignore[assignment]


def quantize_model(
    model: nn.Module,
    mode: str,
    *,
    group_size: int = 64,
    cache: Path | None = None,
    prefill_rows: int = 16,
    fuse: bool = True,
    prefill_weights: str = "float",
    dtype: torch.dtype | None = None,
    prefill_dtype: torch.dtype | None = None,
    gguf: Path | None = None,
    source: str | None = None,
) -> dict[str, object]:
    """Replace every nn.Linear (lm_head included) in place; returns what was done.

    With `cache`, quantized weights are read from that file when present (no
    re-quantization) and written there the first time. With `fuse`, projections that
    share an input run as one kernel call on decode steps (`SiblingGroup`).
    `prefill_weights` is "float", "quantized" or "auto" (module docstring). With `dtype`
    (the dtype the model computes in), a model loaded in a narrower one (a bfloat16
    checkpoint as stored) is widened here one layer at a time, after that layer is
    packed, so that it never holds every weight in both dtypes (`Engine.load`). With
    `prefill_dtype` (bfloat16 in a float32 model: `device.split_dtypes`), the float weights
    kept for prefill are kept in that dtype, as loaded when the checkpoint stores it.
    Mode "gguf" reads the packs it can from `gguf`, the file the model was converted from.
    `source` (`source_fingerprint` of the files the weights come from) is written into the
    cache, and a cache that names other files is not read.
    """
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    if mode == "gguf" and gguf is None:
        raise ValueError("quantization gguf needs the model's GGUF file; none was given")
    if prefill_weights not in PREFILL_WEIGHTS:
        raise ValueError(
            f"prefill_weights must be one of {PREFILL_WEIGHTS}, got {prefill_weights!r}"
        )
    if mode == "none":
        return {"mode": "none"}
    start = time.perf_counter()
    # The vocabulary projection may share its weight with the token embedding, which looks
    # rows up and must stay row-major (and whose prefill needs only the last position).
    # It costs nothing to keep, so it keeps its float weight whatever prefill_weights says.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    vocabulary = _vocabulary_projection(model)
    kept_dtype = prefill_dtype or dtype
    itemsize = kept_dtype.itemsize if kept_dtype is not None else None
    float_bytes = sum(
        m.weight.numel() * (itemsize or m.weight.element_size())
        for _, m in _targets(model)
        if id(m.weight) not in embeddings and m is not vocabulary
    )
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Embedding):  # a tied lm_head shares it: widened with it
                _widen(module, dtype)
    # Only "auto" looks at the memory (Engine.load passes a choice it already made).
    available = available_memory() if prefill_weights == "auto" else None
    prefill_weights = choose_prefill_weights(prefill_weights, float_bytes, available)
    scratch = PrefillScratch() if prefill_weights == "quantized" else None
    dropped = fused = 0
    narrow_kept: set[int] = set()  # prefill weights kept in prefill_dtype: never widened
    targets = _targets(model)
    from_cache = _cache_complete(cache, [name for name, _ in targets], source)
    from_gguf = None
    if mode == "gguf" and gguf is not None and not from_cache:
        from generation.gguf_packs import GgufPacks  # it builds on this module's quantizers

        try:
            from_gguf = GgufPacks(gguf)
        except (OSError, ValueError) as exc:
            # A damaged GGUF beside a sound checkpoint: the weights are still the model's.
            logger.warning(
                "%s cannot be read (%s); packing every projection as int8 from the model's weights",
                gguf,
                exc,
            )
    to_save: dict[str, torch.Tensor] = {}
    # Packs are read one at a time with pread into memory of their own, not through a
    # mapping of the file: a mapping stays resident until its last tensor dies, so packs
    # that `hugepages.move_packs` copied away stayed in memory too (1.5B: peak 4.6 GB
    # while loading instead of 3.2).
    with (
        safe_open(str(cache), framework="pt", backend="pread")
        if from_cache
        else contextlib.nullcontext()
    ) as stored:
        stored_keys = set(stored.keys()) if stored is not None else set()
        for index, (name, linear) in enumerate(targets):
            # The vocabulary projection multiplies one row a sequence (see below).
            on_gemm = prefill_weights == "integer" and linear is not vocabulary
            if stored is not None:
                keys = ("qweight", "scales")
                if on_gemm and f"{name}.{GEMM_PACKS[0]}" in stored_keys:
                    keys += GEMM_PACKS
                packed = {key: stored.get_tensor(f"{name}.{key}") for key in keys}
            elif from_gguf is not None:
                _, packed = from_gguf.pack(
                    name,
                    linear.weight.detach(),
                    lambda w: QuantizedLinear.quantize(w, "int8", group_size),
                )
            else:  # int8 and int4; gguf only when its file could not be read
                kind = "int8" if mode == "gguf" else mode
                packed = QuantizedLinear.quantize(linear.weight.detach(), kind, group_size)
            layer_mode = mode
            if mode == "gguf":  # per layer, from the cache too: int4 packs are uint8
                layer_mode = "int4" if packed["qweight"].dtype == torch.uint8 else "int8"
            # Packed from the narrow values if the model was loaded narrow: the same packs.
            quantized = QuantizedLinear(
                linear,
                layer_mode,
                group_size=GGUF_GROUP if mode == "gguf" else group_size,
                prefill_rows=prefill_rows,
                packed=packed,
                dtype=dtype,
            )
            if stored is None:
                for key, value in quantized.cache_form(packed).items():
                    to_save[f"{name}.{key}"] = value
            tied = id(linear.weight) in embeddings
            if linear is vocabulary and quantized.kernel and not tied:
                # It multiplies one row a sequence: the prefill's last position (the engine
                # asks for logits_to_keep=1) and each decode step's token, which the kernel
                # takes however many sequences are batched. A float copy would never be read
                # (the 1.5B: 0.93 GB in float32).
                quantized.drop_float_weight(None)
                _drop_weight(linear)
            elif on_gemm and quantized.prefill_on_gemm():
                if not tied:
                    _drop_weight(linear)
                dropped += 1
            elif scratch is not None and quantized.kernel and not tied:
                quantized.drop_float_weight(scratch)
                _drop_weight(linear)
                dropped += 1
            elif prefill_dtype is not None and not tied:
                # Row-major: bfloat16 GEMMs ran as fast as column-major ones or faster on a
                # Zen 4 EPYC (623 rows, the 1.5B's shapes: 0.87-1.0x the time).
                kept = linear.weight.detach().to(prefill_dtype)  # as loaded when stored so
                quantized.weight = nn.Parameter(kept, requires_grad=False)
                narrow_kept.add(id(quantized.weight))
                if kept.data_ptr() != linear.weight.data_ptr():
                    _drop_weight(linear)
            # Measured for fp32 only (the CPU's default dtype): other dtypes keep the layout.
            elif (dtype or linear.weight.dtype) == torch.float32 and not tied:
                quantized.weight = prefill_layout(linear.weight)
                _drop_weight(linear)
            if not quantized.gemm:
                quantized.six_bit = None  # read by the GEMM only
            if dtype is not None:
                _widen(quantized, dtype, narrow_kept)  # the bias, and a weight kept as it is
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, quantized)
            following = (
                targets[index + 1][0].rpartition(".")[0] if index + 1 < len(targets) else None
            )
            if fuse and following != parent_name:
                # A module's projections are consecutive targets. Stacking them as soon as the
                # last one is packed frees their separate packs now, not after the loop, which
                # kept both copies of 0.9 GB (1.5B int8) alive at once.
                fused += fuse_module(parent)
    if cache is not None and to_save:
        tmp = cache.with_name(cache.name + ".tmp")
        save_file(to_save, str(tmp), metadata={SOURCE_KEY: source} if source else None)
        tmp.replace(cache)
        for name in SUPERSEDED.get(cache.name, ()):
            stale = cache.with_name(name)
            if stale.exists():
                logger.info("removing %s: %s replaces it", stale, cache.name)
                stale.unlink()
    to_save.clear()  # before the trim: the fused members' own packs (0.9 GB on the 1.5B)
    if dtype is not None:
        for module in model.modules():  # norms and the like
            _widen(module, dtype, narrow_kept)
    return_freed_memory()
    seconds = time.perf_counter() - start
    if scratch is not None and dropped == 0:
        # Without ragqa's kernels (no AVX2, no compiler) nothing can expand the packs.
        logger.warning("prefill_weights quantized needs ragqa's kernels; keeping float weights")
        prefill_weights = "float"
    if prefill_weights == "integer" and dropped == 0:
        # int8 packs only, or no kernels: every layer kept its float weight.
        logger.warning(
            "prefill_weights integer needs int4 packs (or int8 within -16..15, or Q6_K "
            "blocks) and ragqa's kernels; float weights kept"
        )
        prefill_weights = "float"
    # What the layers hold, not what all copies would take: with "integer" only the layers
    # left off the GEMM keep theirs (the 1.5B gguf: 0.15 of its 5.24 GB).
    kept = [m.weight for m in model.modules() if isinstance(m, QuantizedLinear)]
    kept_bytes = sum(
        w.numel() * w.element_size() for w in kept if w is not None and id(w) not in embeddings
    )
    logger.info(
        "quantized to %s in %.1f s (%s); prefill from %s weights (%.2f GB of float copies "
        "kept, of %.2f GB for every layer)",
        mode,
        seconds,
        "cached" if from_cache else "computed",
        prefill_weights,
        kept_bytes / 1e9,
        float_bytes / 1e9,
    )
    return {
        "mode": mode,
        "group_size": group_size,
        "seconds": seconds,
        "from_cache": from_cache,
        "fused_groups": fused,
        "prefill_weights": prefill_weights,
    }
