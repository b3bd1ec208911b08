"""The int4 x int8 decode kernel (csrc/q4_gemv.cpp): building it, its weight layout, calling it.

The C++ source is compiled once per machine with torch's extension builder (ninja and a
C++ compiler) and cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
Where it cannot be built or the CPU lacks AVX2/FMA/F16C, `load()` returns False and
callers keep torch's own int4 kernel; nothing else changes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "q4_gemv.cpp"
BLOCK = 32  # activations are quantized per block of 32 inputs (the kernel's constant)

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_supported() -> bool:
    # The kernel is compiled for AVX2 + FMA + F16C; torch reports AVX2 or better only
    # where all three exist (every x86-64 CPU since 2013 with AVX2 has them).
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def load() -> bool:
    """Build (first time on this machine) and load the kernel; False when unavailable."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok = False
        if not _cpu_supported():
            logger.info(
                "int4 decode kernel needs AVX2 (CPU capability %s); using torch's int4 kernel",
                torch.backends.cpu.get_cpu_capability(),
            )
        else:
            try:
                from torch.utils import cpp_extension

                cpp_extension.load(
                    name="ragqa_q4",
                    sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                    # libgomp.so.1 resolves to the copy torch already loaded (same
                    # soname), so the kernel shares torch's OpenMP thread pool.
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
                ok = hasattr(torch.ops.ragqa_q4, "q4_linear")
            except Exception as exc:  # a missing compiler or ninja must not stop the service
                logger.warning(
                    "could not build the int4 decode kernel (%s); using torch's int4 kernel",
                    exc,
                )
        _state["ok"] = ok
        return ok


def supports(in_features: int, group_size: int) -> bool:
    return group_size % BLOCK == 0 and in_features % group_size == 0


def pack(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From `quant.quantize_int4`'s output to the kernel's layout.

    q [N, K] uint8 0..15, scales_and_zeros [K/g, N, 2] (w = (q - 8) * scale + zero)
    -> qs [N, K/2] uint8 (per block of 32: byte j = q[j] | q[j + 16] << 4),
       sm [N, K/g, 2] float16 (w = q * s + m, so m = zero - 8 * scale).
    """
    n, k = q.shape
    blocks = q.reshape(n, k // BLOCK, 2, BLOCK // 2).to(torch.uint8)
    qs = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    scale = scales_and_zeros[..., 0].float().transpose(0, 1)
    zero = scales_and_zeros[..., 1].float().transpose(0, 1)
    sm = torch.stack([scale, zero - 8 * scale], dim=-1).to(torch.float16).contiguous()
    return qs, sm


def linear(x: torch.Tensor, qs: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] (any float dtype) -> [M, N] float32."""
    return torch.ops.ragqa_q4.q4_linear(x.float(), qs, sm, group_size)
