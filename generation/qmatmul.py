"""ragqa's CPU kernels: building, weight layout, calls.

csrc/qmatmul.cpp holds the int4/int8 x int8 matmuls of quantized decode steps (their
kernels in csrc/decode_avx2.h and csrc/decode_avx512.h),
csrc/panel_gemm.cpp and csrc/q4k_gemm.cpp those of long prefills,
csrc/decode_attention.cpp the float32 attention of a decode step's one new token and
csrc/decode_layer.cpp a quantized decoder layer's decode step built from both. The C++
sources are compiled once per machine and torch version with torch's extension
builder (ninja and a C++ compiler) into a folder under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions). Where it cannot be built or the CPU lacks AVX2/FMA/F16C,
`load()` returns False and callers keep torch's own weight-only kernels; nothing else
changes. The matmuls run on AVX-512 VNNI where the CPU has it and on AVX2 elsewhere
(`kernel_isa`); both paths live in one library built for AVX2.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "qmatmul.cpp",
        "panel_gemm.cpp",
        "q4k_gemm.cpp",
        "q6k_linear.cpp",
        "decode_attention.cpp",
        "decode_layer.cpp",
    )
]
HEADERS = [
    CSRC / name
    for name in ("kernel_common.h", "panel_common.h", "decode_avx2.h", "decode_avx512.h")
]
BLOCK = 32  # activations are quantized per block of 32 inputs (the kernels' constant)

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_supported() -> bool:
    # Compiled for AVX2 + FMA + F16C; torch reports AVX2 or better only where all three
    # exist (every x86-64 CPU with AVX2 has FMA and F16C).
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_directory() -> Path:
    """Where the kernels are compiled: one folder per torch build and Python version."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    # A torch upgrade changes the ABI the compiled library links against, and torch's own
    # change detection looks only at the source and flags: the torch version (which names
    # the CPU or CUDA build too) is part of the folder so an upgrade compiles afresh.
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return Path(root) / "ragqa_qmatmul" / tag.replace("+", "_")


def _headers_flag() -> str:
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in HEADERS)).hexdigest()
    return f"-DRAGQA_HEADERS_SHA256={digest[:16]}"


def _build_and_load(folder: Path) -> None:
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    # torch serialises builds with a `lock` file that only its creator removes, so a build
    # killed midway (a stopped container, a cancelled test run) leaves a file that makes
    # every later load wait on it for ever. An flock is released by the kernel when its
    # holder dies: whoever holds it is the only process that can be building here, so a
    # `lock` file it finds is one left behind.
    with open(folder / "ragqa.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a kernel build that did not finish", stale)
            stale.unlink()
        cpp_extension.load(
            name="ragqa_qmatmul",
            sources=[str(path) for path in SOURCES],
            # The headers' hash is a flag so that a change to them rebuilds the library:
            # torch decides whether to rebuild from the sources and flags alone.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", _headers_flag()],
            # libgomp.so.1 resolves to the copy torch already loaded (same soname), so
            # the kernels share torch's OpenMP thread pool.
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )


def load() -> bool:
    """Build (the first time on this machine) and load the kernels; False when unavailable."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if not _cpu_supported():
            logger.info(
                "the int4/int8 kernels need AVX2 (CPU capability %s); using torch's kernels",
                torch.backends.cpu.get_cpu_capability(),
            )
        else:
            try:
                _build_and_load(build_directory())
                ok = hasattr(torch.ops.ragqa_qmatmul, "q4_linear")
            except Exception as exc:  # a missing compiler or ninja must not stop the service
                logger.warning(
                    "could not build the int4/int8 kernels (%s); using torch's kernels, which "
                    "on CPUs without AVX-512 decode slower than RAGQA_QUANTIZATION=none",
                    exc,
                )
        _state["ok"] = ok
        return ok


def supports_int4(in_features: int, group_size: int) -> bool:
    # The kernel reads blocks of 32 inputs two at a time (one 32-byte load of nibbles).
    return group_size % BLOCK == 0 and in_features % group_size == 0 and in_features % 64 == 0


def supports_int6(in_features: int) -> bool:
    # 6-bit packs are a GGUF's Q6_K blocks: 256 inputs each.
    return in_features % 256 == 0


def supports_int8(in_features: int) -> bool:
    return in_features % BLOCK == 0


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] values 0..15 -> [N, K/2] uint8: per 64 inputs 32 bytes, byte j holding
    input j in its low nibble and input 32 + j in its high one (llama.cpp's Q4_K order)."""
    n, k = q.shape
    pairs = q.reshape(n, k // 64, 2, 32).to(torch.uint8)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: qs [N, K/2] uint8 -> [N, K] uint8 values 0..15."""
    n, half = qs.shape
    pairs = qs.reshape(n, half // 32, 1, 32)
    return torch.cat([pairs & 0xF, pairs >> 4], dim=2).reshape(n, 2 * half)


def int4_scales(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """`quant.quantize_int4`'s scales_and_zeros [K/g, N, 2] (w = (q - 8) * scale + zero)
    -> the kernel's sm [N, K/g, 2] float16 (w = q * s + m, so m = zero - 8 * scale)."""
    scale = scales_and_zeros[..., 0].float().transpose(0, 1)
    zero = scales_and_zeros[..., 1].float().transpose(0, 1)
    return torch.stack([scale, zero - 8 * scale], dim=-1).to(torch.float16).contiguous()


def pack_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From `quant.quantize_int4`'s output to the int4 kernel's layout: q [N, K] uint8
    0..15 -> qs [N, K/2] uint8 (`pack_nibbles`), and sm (`int4_scales`)."""
    return pack_nibbles(q), int4_scales(scales_and_zeros)


def int4_linear(
    x: torch.Tensor, qs: torch.Tensor, sm: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] (any float dtype) -> [M, N] float32."""
    return torch.ops.ragqa_qmatmul.q4_linear(x.float(), qs, sm, group_size)


def _gemm_input(x: torch.Tensor) -> torch.Tensor:
    """The integer GEMMs read float32 or bfloat16 activations and write their output in the
    same dtype (a bfloat16 one is the float32 one rounded, bit for bit), which spares a
    bfloat16 model's prefill the passes that widened each input and narrowed each output.
    Other dtypes are widened to float32."""
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()


def int4_gemm(x: torch.Tensor, qs: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    """What `int4_linear` computes, for a long prefill: x [M, K] (any float dtype) -> [M, N]
    bfloat16 for bfloat16 x, else float32 (`_gemm_input`), on an integer GEMM that lays the
    packs out in panels as it goes (AVX-512 VNNI or AVX2, as `kernel_isa` says; the two give
    the same floats bit for bit)."""
    return torch.ops.ragqa_qmatmul.q4_gemm(_gemm_input(x), qs, sm, group_size)


def q4k_gemm(
    x: torch.Tensor, qs: torch.Tensor, codes: torch.Tensor, dd: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (any float dtype, K a multiple of 256) times a GGUF's Q4_K weights, w = d *
    sc * q - dmin * m: qs [N, K/2] uint8 (the int4 packs' nibbles), codes [N, K/32, 2]
    uint8 (sc, m), dd [N, K/256, 2] float16 (d, dmin) (`gguf_packs.unpack_q4_k`) -> [M, N]
    float32, on the AVX2 integer GEMM with activations in int8 per 256 inputs."""
    return torch.ops.ragqa_qmatmul.q4k_gemm(x.float(), qs, codes, dd)


def int8_gemm(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What `int8_linear` computes, for a long prefill, where every weight value lies in
    -16..15 (`narrow_int8`): x [M, K] (any float dtype) -> [M, N] bfloat16 for bfloat16 x,
    else float32 (`_gemm_input`)."""
    return torch.ops.ragqa_qmatmul.q8_gemm(_gemm_input(x), qw, scales)


def int6_gemm(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (any float dtype) times the weights of a GGUF's Q6_K blocks, w = q * scale
    * d: q [N, K] int8 in -32..31, scales [N, K/16] int8, d [N, K/256] float16 (K a
    multiple of 256; `gguf_packs.unpack_q6_k`) -> [M, N] bfloat16 for bfloat16 x, else
    float32 (`_gemm_input`), on the integer GEMM. Values outside -32..31 raise RuntimeError."""
    return torch.ops.ragqa_qmatmul.q6_gemm(_gemm_input(x), q, scales, d)


def int6_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) times a GGUF's Q6_K blocks as they are (K a multiple of
    256): qw [N, K/256*192] uint8 (each block's nibbles and bit pairs), sw [N, K/256*18]
    uint8 (its 16 int8 scales and float16 d; `gguf_packs.split_q6_k`) -> [M, N] float32,
    for decode steps (on the kernels `kernel_isa` names)."""
    return torch.ops.ragqa_qmatmul.q6k_linear(x.float(), qw, sw)


def int6_dequantize(qw: torch.Tensor, sw: torch.Tensor, out: torch.Tensor) -> None:
    """`int6_linear`'s packs -> out [N, K] float32, the weights they stand for (in place)."""
    torch.ops.ragqa_qmatmul.q6k_dequantize(qw, sw, out)


def narrow_int8(qw: torch.Tensor) -> bool:
    """Whether int8 packs hold only -16..15 (a GGUF's Q5_0 blocks), as `int8_gemm` needs."""
    if qw.numel() == 0:
        return False
    low, high = torch.aminmax(qw)  # one pass over the packs
    return int(low) >= -16 and int(high) <= 15


def int8_linear(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype), qw [N, K] int8, scales [N, K/32] float16 -> [M, N] float32."""
    return torch.ops.ragqa_qmatmul.q8_linear(x.float(), qw, scales)


def int8_dequantize(qw: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """qw [N, K] int8, scales [N, K/32] float16 -> out [N, K] float32 (written in place)."""
    torch.ops.ragqa_qmatmul.q8_dequantize(qw, scales, out)


def int4_dequantize(qs: torch.Tensor, sm: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """qs [N, K/2] uint8, sm [N, K/g, 2] float16 -> out [N, K] float32 (written in place)."""
    torch.ops.ragqa_qmatmul.q4_dequantize(qs, sm, group_size, out)


KERNEL_ISAS = ("avx2", "avx512-vnni")


def kernel_isa() -> str:
    """The instruction set `int4_linear` and `int8_linear` run on: "avx512-vnni" where the
    CPU has it (avx512f/bw/vl/dq + vnni), else "avx2". Needs `load()`."""
    return torch.ops.ragqa_qmatmul.kernel_isa()


def set_kernel_isa(isa: str) -> str:
    """Runs the matmuls on `isa` (one of KERNEL_ISAS) from now on in this process and
    returns the previous one: for tests and benchmarks that compare the two on one CPU.
    The two sum the same integer products but add the floats in another order, so their
    outputs differ in rounding. Raises ValueError for another name or a CPU without it."""
    if isa not in KERNEL_ISAS:
        raise ValueError(f"kernel isa must be one of {KERNEL_ISAS}, got {isa!r}")
    try:
        return torch.ops.ragqa_qmatmul.set_kernel_isa(isa)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from exc


def available_kernel_isas() -> list[str]:
    """The KERNEL_ISAS this CPU runs (avx2 always, once `load()` has succeeded). Asks the
    CPU rather than trying each choice, which would switch other threads' kernels too."""
    if torch.ops.ragqa_qmatmul.avx512_vnni_supported():
        return list(KERNEL_ISAS)
    return ["avx2"]


def two_part_activations() -> bool:
    """Whether `int4_linear`, `int8_linear` and `int6_linear` take their activations in two
    int8 parts (the default): x ~ d (q + r / 256) per block of 32, the second part rounding
    what the first leaves, so each activation is off by at most d / 512 instead of d / 2
    (csrc/kernel_common.h, kFineBits). The prefill GEMMs always take one part. Needs
    `load()`."""
    return torch.ops.ragqa_qmatmul.two_part_activations()


def set_two_part_activations(on: bool) -> bool:
    """Two-part (True) or one-part int8 activations for the decode kernels from now on in
    this process; returns the previous choice: for tests and benchmarks comparing the two."""
    return torch.ops.ragqa_qmatmul.set_two_part_activations(on)


def loaded() -> bool:
    """Whether `load()` has already succeeded in this process (never builds)."""
    return _state.get("ok", False)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """query [B, Hq, D] float32, key/value [B, Hkv, T, D] with contiguous rows, both float32
    or both bfloat16, mask [B, T] bool (True = attend) or None -> [B, Hq, D] float32."""
    return torch.ops.ragqa_qmatmul.decode_attention(query, key, value, mask, scale)


def decode_layer_inputs(
    h: torch.Tensor, weights: tuple[Any, ...], cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [B, 1, H] -> q [B, Hq, 1, D], k and v [B, Hkv, 1, D] (csrc/decode_layer.cpp);
    `weights` as `lean_decode._fused_arguments` orders them, cos and sin [B, 1, 1, D]."""
    return torch.ops.ragqa_qmatmul.decode_layer_inputs(h, *weights, cos, sin)


def decode_layer_output(
    h: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    weights: tuple[Any, ...],
) -> torch.Tensor:
    """The layer's output [B, 1, H] from its input h, q and the caches [B, Hkv, T, D]
    holding the new position; mask [B, T] bool (True = attend) or None."""
    return torch.ops.ragqa_qmatmul.decode_layer_output(h, q, keys, values, mask, scale, *weights)
