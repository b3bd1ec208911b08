"""Device and dtype choice: CUDA + bf16 when present; on CPU bf16 only where it is fast."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The words of /proc/cpuinfo (its flags among them); empty where it cannot be read."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AVX-512-BF16 or AMX: bf16 matmuls run 2-4x faster than fp32 there (measured)."""
    return not _cpu_flags().isdisjoint(("avx512_bf16", "amx_bf16"))


def cpu_has_amx() -> bool:
    """Intel AMX tiles: bf16 GEMMs there keep the prefill (`quant_load.integer_prefill_pays`)."""
    return "amx_bf16" in _cpu_flags()


def choose_device(requested: str = "auto") -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {requested!r}")
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def split_dtypes(
    device: torch.device,
    requested: str,
    chosen: torch.dtype,
    quantized_kernels: bool,
    quantization: str,
) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype a model computes in, the dtype its long prefill matmuls multiply in).

    They differ in one case: `requested` "auto" chose bfloat16 on a CPU and the model's
    decode steps run on ragqa's int8/int4 kernels (`quantized_kernels`, `quantization`
    int8 or int4). Those steps read packed weights whatever the dtype, and a bfloat16 model
    decoded through Python glue and a float32 copy of its KV cache every step; prefill,
    though, is compute-bound and bfloat16 GEMMs run twice as fast as float32 ones on such
    CPUs. So the model computes in float32 and its prefill matmuls take bfloat16 weights
    and activations. On a Zen 4 EPYC (AVX-512-BF16, 2 threads, 0.5B int8, 623-token
    prompt, `bench/generation.py`): bfloat16 decoded at 41.7 tok/s with a 1.90 s TTFT,
    float32 at 51.7 tok/s with 2.75 s. Since then bfloat16 decode steps take the fused C++
    layer and the attention kernel too (gguf on machine Z, 1.13-1.16x the decode speed);
    whether the split still pays for int8/int4 was not measured again.

    gguf stays in bfloat16 throughout: its prefill then runs the unquantized model's own
    bfloat16 arithmetic on the checkpoint's weights, so the answerability check and the
    first token agree with `none`. On Intel Xeons with AMX (model 167; 1.5B, 100 SQuAD2
    questions, `bench/eval_qa.py`): 92 of 100 outputs identical to none's in bfloat16, 89
    with the split (another machine of the same kind; 86 in bfloat16 on a third, once
    bfloat16 decode steps took the fused layer and the attention kernel, accuracy +4.5
    points there); on one of them decode 18.7 tok/s against 20.6 with the split, TTFT
    1.24 s against 1.66 s, peak RSS 4.3 GB against 5.8.
    On a Zen 5 EPYC (no AMX), with the fused layer: 92 of 100 identical, accuracy unchanged.
    """
    if (
        requested == "auto"
        and device.type == "cpu"
        and chosen == torch.bfloat16
        and quantized_kernels
        and quantization != "gguf"
    ):
        return torch.float32, torch.bfloat16
    return chosen, chosen
