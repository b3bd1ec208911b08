"""Quantizing a loaded model in place, and the on-disk cache of its packs.

`quantize_model` replaces every nn.Linear with a `QuantizedLinear`, packed from the
float weights, from the model's GGUF (`gguf_packs.py`) or from the cache beside the
checkpoint, and decides what long calls (prefill) multiply, `prefill_weights`:
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
  be float32, or bfloat16 without AMX (`integer_prefill_pays`; `Engine.load` decides);
  otherwise "float" when the float copies would take at most half of the memory the
  system has available, else "quantized" (`choose_prefill_weights`; `Engine.load` asks
  before loading the model, `quantize_model` when it is called).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from generation import qmatmul
from generation.gguf_packs import GgufPacks
from generation.memory import available_memory, release_mapped_pages, return_freed_memory
from generation.quant import (
    GEMM_PACKS,
    GGUF_GROUP,
    MODES,
    PREFILL_WEIGHTS,
    Q4K_PACKS,
    PrefillScratch,
    QuantizedLinear,
    prefill_layout,
)
from generation.siblings import fuse_module

logger = logging.getLogger(__name__)


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
    # gguf is "-q4k": it holds Q4_K tensors' codes for their GEMM (Q4K_PACKS) and Q6_K
    # blocks as the decode packs of those tensors (mode q6k) and for the integer GEMM
    # (GEMM_PACKS); a cache written before lacks the Q4_K codes ("-q6k-decode"), holds
    # int8 decode packs for Q6_K ("-q6k") or lacks their GEMM blocks too (no suffix).
    suffix = {"int4": f"-g{group_size}", "gguf": "-q4k"}.get(mode, f"-b{qmatmul.BLOCK}")
    return folder / f"ragqa-quant-{mode}{suffix}.safetensors"


# Caches that a cache of the same name replaces, written by an earlier ragqa: removed
# once the new one is written (the 1.5B's gguf cache is 1.3 GB).
SUPERSEDED = {
    "ragqa-quant-gguf-q4k.safetensors": (
        "ragqa-quant-gguf-q6k-decode.safetensors",
        "ragqa-quant-gguf-q6k.safetensors",
        "ragqa-quant-gguf.safetensors",
    )
}

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


def integer_prefill_pays(
    quantization: str, prefill_dtype: torch.dtype, *, on_kernels: bool, amx: bool
) -> bool:
    """Whether "auto" takes the integer prefill GEMM: int4 and gguf packs (gguf's int4,
    Q5_0 and Q6_K blocks are 97 % of the 1.5B's prefill multiply-adds) on ragqa's kernels,
    unless the float GEMM would be bfloat16 on AMX tiles.

    - float32 float GEMMs (AVX2 CPUs): the integer GEMM takes about half their time.
    - bfloat16 without AMX (Zen 4, Zen 5: AVX-512-BF16): 1.5B gguf TTFT 3.65 s against
      5.34 s in bfloat16 (0.557x and 0.817x llama.cpp's), peak RSS 4.14 GB against 6.76;
      with two-part decode activations 90 of 100 eval outputs identical to none's and
      accuracy unchanged (README, machine AF). At bf16's peak on two Zen 4 cores the 1.5B's
      GEMMs alone take about 4 s.
    - AMX (Intel Xeons): bfloat16 stays; the 1.5B's TTFT there was 1.24 s on AMX tiles
      (`device.split_dtypes`). The integer GEMM was not measured on AMX.
    """
    if not on_kernels or quantization not in ("int4", "gguf"):
        return False
    return prefill_dtype == torch.float32 or (prefill_dtype == torch.bfloat16 and not amx)


def choose_prefill_weights(
    asked: str, float_bytes: int, available: int | None, *, integer: bool = False
) -> str:
    """ "float", "quantized" or "integer" for a prefill_weights setting (module docstring).

    `integer`: `integer_prefill_pays`; "auto" then takes it, faster than either float
    path and without their memory.

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
                if on_gemm and f"{name}.{Q4K_PACKS[0]}" in stored_keys:
                    keys += Q4K_PACKS
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
            if mode == "gguf":  # per layer, from the cache too: int4 values are uint8, and
                # 6-bit packs' scales too (int4 scales are float16, int8 ones as well)
                if packed["scales"].dtype == torch.uint8:
                    layer_mode = "q6k"
                else:
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
                quantized.six_bit = quantized.q4k = None  # read by the GEMM only
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
