"""RAGQA_QUANTIZATION=gguf: packs read from the GGUF a model was converted from."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from generation import gguf_packs, qmatmul
from generation.engine import Engine
from generation.gguf_file import GgufFile
from generation.gguf_packs import (
    GgufPacks,
    dequantize_q6_k,
    find_gguf,
    gguf_name,
    unpack_q4_1,
    unpack_q4_k,
    unpack_q5_0,
    unpack_q6_k,
    unpack_q8_0,
)
from generation.params import GenerationParams
from generation.provision import pull_preset
from generation.quant import GEMM_PACKS, QuantizedLinear, dequantize_int4, dequantize_int8_blocks
from generation.quant_load import cache_path, quantize_model
from tests.conftest import MODEL_DIR

KERNELS = qmatmul.load()
Q4_K, Q4_1 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q4_1
Q5_0, Q8_0 = GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0
Q6_K = GGMLQuantizationType.Q6_K


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)


def q4_k_blocks(n: int, k: int, seed: int) -> np.ndarray:
    """Random Q4_K bytes [n, k/256 * 144]: any codes and nibbles, float16 d and dmin of a
    real model's size (a 1.5B's are ~1e-3)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // 256, 144), dtype=np.uint8)
    for column in (0, 2):  # d, then dmin
        values = (rng.uniform(0.5, 1.0, len(raw)) * 2e-3).astype(np.float16)
        raw[:, column : column + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, k // 256 * 144)


def q6_k_blocks(n: int, k: int, seed: int) -> np.ndarray:
    """Random Q6_K bytes [n, k/256 * 210]: any values and scales, a float16 d that gives
    weights of a real model's size (~0.05)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // 256, 210), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.0, len(raw)) * 3e-5).astype(np.float16)
    raw[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, k // 256 * 210)


def test_q6_k_blocks_unpack_to_the_values_ggufs_own_dequantizer_gives():
    raw = q6_k_blocks(6, 512, seed=2)
    packs = unpack_q6_k(raw, 6, 512)
    assert packs["q6"].dtype == torch.int8 and packs["q6_scales"].shape == (6, 32)
    assert int(packs["q6"].min()) == -32 and int(packs["q6"].max()) == 31
    assert packs["q6_d"].dtype == torch.float16 and packs["q6_d"].shape == (6, 2)
    reference = torch.from_numpy(quants.dequantize(raw, Q6_K))  # [6, 512]
    assert torch.equal(dequantize_q6_k(packs), reference)


def test_q4_k_blocks_unpack_to_the_values_ggufs_own_dequantizer_gives():
    raw = q4_k_blocks(6, 512, seed=1)
    reference = torch.from_numpy(quants.dequantize(raw, Q4_K))  # [6, 512]
    q, scales_and_zeros = unpack_q4_k(raw, 6, 512)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales_and_zeros.shape == (16, 6, 2)
    ours = dequantize_int4(q, scales_and_zeros, 32)
    # zero = m + 8 s in float32: the round trip moves a weight by float32 rounding only
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * reference.abs().max())
    # and the int4 kernel's float16 scale and minimum keep it within 2^-11 of the weights
    qs, sm = qmatmul.pack_int4(q, scales_and_zeros)
    kernel_form = torch.empty(6, 512)
    if KERNELS:
        qmatmul.int4_dequantize(qs, sm, 32, kernel_form)
        assert (kernel_form - reference).abs().max() <= 2**-10 * reference.abs().max()


def test_q4_1_blocks_are_int4_packs_of_group_32_exactly():
    torch.manual_seed(0)
    raw = quants.quantize((torch.randn(5, 256) * 0.05).numpy(), Q4_1)
    q, scales_and_zeros = unpack_q4_1(raw, 5, 256)
    reference = torch.from_numpy(quants.dequantize(raw, Q4_1))
    torch.testing.assert_close(
        dequantize_int4(q, scales_and_zeros, 32), reference, rtol=0, atol=1e-7
    )
    _, sm = qmatmul.pack_int4(q, scales_and_zeros)  # float16 d and m, as the file has them
    assert torch.equal(sm[0, 0, 0], torch.from_numpy(raw[0, 0:2].copy().view(np.float16))[0])


@pytest.mark.parametrize(("kind", "unpack"), [(Q8_0, unpack_q8_0), (Q5_0, unpack_q5_0)])
def test_q8_0_and_q5_0_blocks_are_int8_packs_exactly(kind, unpack):
    torch.manual_seed(0)
    raw = quants.quantize(torch.randn(5, 256).numpy(), kind)
    q, scales = unpack(raw, 5, 256)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (5, 8)
    assert torch.equal(
        dequantize_int8_blocks(q, scales), torch.from_numpy(quants.dequantize(raw, kind))
    )


# The tiny model's GGUF: which type each projection's weight has (None: not in the file).
# Layer 0's v is Q8_0, so its q/k/v, stacked, all take int8, and its o is Q6_K (its blocks
# as they are for decode steps, unpacked for the integer GEMM); layer 1 is all Q4_K.
TYPES = {
    0: {"q": Q4_K, "k": Q4_K, "v": Q8_0, "o": Q6_K, "gate": Q4_K, "up": Q4_K, "down": Q5_0},
    1: {"q": Q4_K, "k": Q4_K, "v": Q4_K, "o": Q4_K, "gate": Q4_K, "up": Q4_K, "down": Q4_K},
}
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def finish(writer: GGUFWriter) -> None:
    """Write out and close a GGUF file whose fields and tensors are all added."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_model(tokenizer, folder: Path) -> LlamaForCausalLM:
    """A random 2-layer Llama (rows of 256 inputs: whole Q4_K blocks) whose projections hold
    the dequantized values of folder/model.gguf, as a converted checkpoint does; lm_head is
    not in the file."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(folder / "model.gguf"), "llama")
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for layer, types in TYPES.items():
        for part, kind in types.items():
            name = f"model.layers.{layer}.{MODULES[part]}"
            linear = model.get_submodule(name)
            n, k = linear.weight.shape
            if kind == Q4_K:
                raw = q4_k_blocks(n, k, seed=layer * 10 + len(part))
            elif kind == Q6_K:
                raw = q6_k_blocks(n, k, seed=layer * 10 + len(part))
            else:
                raw = quants.quantize((torch.randn(n, k) * 0.05).numpy(), kind)
            values = torch.from_numpy(quants.dequantize(raw, kind)).float()
            if part in ("q", "k"):
                # llama.cpp stores a Llama's q and k rows with each head's rotary halves
                # interleaved; the model's rows are transformers' undoing of that.
                heads = 4 if part == "q" else 2
                values = values.reshape(heads, n // heads // 2, 2, k).transpose(1, 2).reshape(n, k)
            linear.weight.data = values
            writer.add_tensor(gguf_name(name), raw, raw_dtype=kind)
    finish(writer)
    return model


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
@pytest.mark.parametrize("prefill_weights", ["float", "quantized", "integer"])
def test_gguf_mode_takes_4_and_6_bit_blocks_as_they_are_and_int8_where_siblings_differ(
    tokenizer, tmp_path, prefill_weights
):
    model = gguf_model(tokenizer, tmp_path)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "bias")}
    with torch.inference_mode():
        prompt = torch.tensor([tokenizer.encode("Copper wires carry current " * 6)])
        float_logits = model(prompt).logits[0, -1]
    done = quantize_model(
        model,
        "gguf",
        gguf=tmp_path / "model.gguf",
        cache=cache_path(tmp_path, "gguf", 64),
        prefill_weights=prefill_weights,
    )
    assert done["mode"] == "gguf" and not done["from_cache"]
    modes = {
        (layer, part): (m.mode, m.group_size)
        for layer in TYPES
        for part, module in MODULES.items()
        for m in [model.get_submodule(f"model.layers.{layer}.{module}")]
    }
    assert {p for p, mode in modes.items() if mode == ("int4", 32)} == {
        (0, "gate"),
        (0, "up"),
        *((1, part) for part in MODULES),
    }
    assert {modes[(0, part)][0] for part in ("q", "v", "down")} == {"int8"}
    assert modes[(0, "o")][0] == "q6k"
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    # Its decode packs are the file's blocks: exactly the model's weights.
    expanded = torch.empty_like(floats["model.layers.0.self_attn.o_proj"])
    qmatmul.int6_dequantize(o_proj.qweight, o_proj.scales, expanded)
    assert torch.equal(expanded, floats["model.layers.0.self_attn.o_proj"])
    if prefill_weights == "integer":  # its Q6_K blocks, exactly, for the GEMM
        q6, q6_scales, q6_d = o_proj.six_bit
        packs = {"q6": q6, "q6_scales": q6_scales, "q6_d": q6_d}
        assert torch.equal(dequantize_q6_k(packs), floats["model.layers.0.self_attn.o_proj"])
    else:  # read by the GEMM only: not kept
        assert o_proj.six_bit is None
    assert model.lm_head.mode == "int8"
    for name, weight in floats.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, QuantizedLinear):
            continue
        if layer.mode == "int4":
            expanded = torch.empty_like(weight)
            qmatmul.int4_dequantize(layer.qweight, layer.scales, 32, expanded)
            # float16 scale and minimum: within 2^-10 of the weights' range
            assert (expanded - weight).abs().max() <= 2**-10 * weight.abs().max()
        elif name.endswith(("v_proj", "down_proj")) and ".0." in name:  # Q8_0 and Q5_0: exact
            assert torch.equal(dequantize_int8_blocks(layer.qweight, layer.scales), weight)
    if prefill_weights == "integer":
        # On the GEMM: int4 layers, layer 0's down (Q5_0: int8 within -16..15) and o (its
        # Q6_K blocks); layer 0's q, k and v (int8 requantized beside a Q8_0 v) keep float
        # copies.
        on_gemm = {
            n
            for n in floats
            if isinstance(model.get_submodule(n), QuantizedLinear) and model.get_submodule(n).gemm
        }
        expected = {f"model.layers.{layer}.{MODULES[part]}" for layer, part in modes}
        expected -= {f"model.layers.0.{MODULES[part]}" for part in ("q", "k", "v")}
        assert on_gemm == expected
        assert all(model.get_submodule(n).weight is None for n in on_gemm)
    # A prompt longer than prefill_rows multiplies float or expanded weights (or int4 packs
    # by int8 activations): what the model's own floats give, within the rounding.
    with torch.inference_mode():
        logits = model(prompt).logits[0, -1]
    assert (logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()
    assert int(logits.argmax()) == int(float_logits.argmax())


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
def test_lean_decode_of_a_gguf_model_mixing_int4_and_int8_equals_transformers_forward(
    tokenizer, tmp_path
):
    model = gguf_model(tokenizer, tmp_path)
    quantize_model(model, "gguf", gguf=tmp_path / "model.gguf", group_size=64)
    engine = Engine(model, tokenizer, name="gguf")
    assert engine.lean is not None
    # Both layers take the C++ path, layer 0 with int8 q/k/v and down and a 6-bit o beside
    # int4 gate/up.
    assert [layer.fused is not None for layer in engine.lean.layers] == [True, True]
    prompt = tokenizer.encode("A prompt about copper wires")
    out = engine.generate(prompt, GenerationParams(max_new_tokens=12, ignore_eos=True))
    # transformers' generate on the same quantized model, greedy: the same tokens
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12
        )[0, len(prompt) :].tolist()
    assert out.token_ids == expected


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
def test_a_second_load_reads_the_cache_and_not_the_gguf(tokenizer, tmp_path):
    cache = cache_path(tmp_path, "gguf", 64)
    # Earlier ragqas': without Q6_K blocks, with them for the GEMM only, without Q4_K codes.
    stale = [
        tmp_path / "ragqa-quant-gguf.safetensors",
        tmp_path / "ragqa-quant-gguf-q6k.safetensors",
        tmp_path / "ragqa-quant-gguf-q6k-decode.safetensors",
    ]
    for file in stale:
        file.write_bytes(b"packs without the Q6_K blocks for decode steps")
    first = gguf_model(tokenizer, tmp_path)
    quantize_model(first, "gguf", gguf=tmp_path / "model.gguf", cache=cache)
    assert cache.name == "ragqa-quant-gguf-q4k.safetensors" and cache.exists()
    assert not any(file.exists() for file in stale)
    second = gguf_model(tokenizer, tmp_path / "other")  # the same weights (seeds), a new file
    (tmp_path / "other" / "model.gguf").unlink()  # a read of it would fail
    o_name = "model.layers.0.self_attn.o_proj"
    o_weight = second.get_submodule(o_name).weight.detach().clone()
    # The first load's prefill kept float copies; the cache holds the Q6_K blocks anyway.
    done = quantize_model(
        second,
        "gguf",
        gguf=tmp_path / "other" / "model.gguf",
        cache=cache,
        prefill_weights="integer",
    )
    assert done["from_cache"]
    six_bit = second.get_submodule(o_name).six_bit
    assert six_bit is not None and second.get_submodule(o_name).gemm
    assert torch.equal(dequantize_q6_k(dict(zip(GEMM_PACKS, six_bit, strict=True))), o_weight)
    # Layer 1 is all Q4_K: its projections carry the file's codes for the Q4_K GEMM.
    up = second.get_submodule("model.layers.1.mlp.up_proj")
    assert up.gemm and up.q4k is not None and up.q4k[0].shape == (up.out_features, 256 // 32, 2)
    for (name, a), (_, b) in zip(first.named_modules(), second.named_modules(), strict=True):
        if isinstance(a, QuantizedLinear):
            assert (a.mode, a.group_size) == (b.mode, b.group_size), name
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales), name


def test_a_tensor_whose_values_are_not_the_models_is_packed_from_the_models_weights(
    tokenizer, tmp_path, caplog
):
    model = gguf_model(tokenizer, tmp_path)
    packs = GgufPacks(tmp_path / "model.gguf")
    name = "model.layers.1.mlp.up_proj"
    other = torch.randn(256, 256) * 0.05  # not what the file holds
    mode, packed = packs.pack(name, other, lambda w: {"qweight": w})
    assert mode == "int8" and packed["qweight"] is other
    assert "blk.1.ffn_up.weight (Q4_K, shape [256, 256]) does not hold the values" in caplog.text
    mode, _ = packs.pack(name, model.get_submodule(name).weight, lambda w: {})
    assert mode == "int4"


def test_a_gguf_of_another_model_leaves_the_projection_to_int8_from_the_models_weights(
    tokenizer, tmp_path, caplog
):
    gguf_model(tokenizer, tmp_path)
    packs = GgufPacks(tmp_path / "model.gguf")
    wider = torch.randn(256, 512)
    mode, packed = packs.pack("model.layers.1.self_attn.q_proj", wider, lambda w: {"qweight": w})
    assert mode == "int8" and packed["qweight"] is wider
    assert "blk.1.attn_q.weight (Q4_K, shape [256, 256]) does not hold the values" in caplog.text
    assert "self_attn.q_proj [256, 512]" in caplog.text


def test_gguf_mode_without_a_gguf_fails_at_load_saying_where_it_looked_and_auto_takes_one(
    tokenizer, tmp_path
):
    folder = tmp_path / "hf"
    model = gguf_model(tokenizer, tmp_path / "elsewhere")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert find_gguf(folder) is None
    with pytest.raises(ValueError, match=r"quantization gguf reads the GGUF .*hf/model\.gguf"):
        Engine.load(folder, device="cpu", quantization="gguf")
    # Beside the folder, as the model cache keeps it, it is found, and "auto" takes it.
    shutil.copy(tmp_path / "elsewhere" / "model.gguf", tmp_path / "model.gguf")
    assert find_gguf(folder) == tmp_path / "model.gguf"
    if KERNELS:
        engine, report = Engine.load(folder, device="cpu", quantization="auto")
        assert report.quantization == "gguf"
        assert engine.model.get_submodule("model.layers.1.mlp.down_proj").mode == "int4"


def test_4_bit_rows_the_int4_kernel_cannot_read_in_pairs_of_blocks_take_int8(tmp_path):
    torch.manual_seed(0)
    raw = quants.quantize((torch.randn(8, 96) * 0.05).numpy(), Q4_1)  # 3 blocks a row
    writer = GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=Q4_1)
    finish(writer)
    weight = torch.from_numpy(quants.dequantize(raw, Q4_1))
    packs = GgufPacks(tmp_path / "model.gguf")
    assert packs.mode_of("model.layers.0.mlp.down_proj") == "int4"  # what the file holds
    mode, packed = packs.pack("model.layers.0.mlp.down_proj", weight, lambda w: {"from": w})
    assert mode == "int8" and packed["from"] is weight


def test_the_gguf_file_reader_gives_the_scalars_and_tensors_ggufs_own_reader_gives(tmp_path):
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_custom_alignment(64)
    writer.add_head_count(12)
    writer.add_float32("qwen2.rope.freq_base", 1e6)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_int64("general.some_count", -5)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "Ġ你好", ""] * 500)
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3] * 100)
    writer.add_string("general.name", "tiny")
    raw = {
        "blk.0.attn_q.weight": q4_k_blocks(4, 256, seed=1),
        "blk.0.ffn_down.weight": quants.quantize(np.random.randn(3, 64).astype(np.float32), Q8_0),
        "output_norm.weight": np.random.randn(96).astype(np.float32),
    }
    for name, data in raw.items():
        kind = None if data.dtype == np.float32 else (Q4_K if "attn_q" in name else Q8_0)
        writer.add_tensor(name, data, raw_dtype=kind)
    finish(writer)

    ours = GgufFile(path)
    theirs = GGUFReader(str(path))
    scalars = {
        key: field.contents()
        for key, field in theirs.fields.items()
        if not key.startswith("GGUF.") and field.types[0] != GGUFValueType.ARRAY
    }
    assert ours.fields == pytest.approx(scalars)
    assert ours.fields["general.alignment"] == 64 and "tokenizer.ggml.tokens" not in ours.fields
    assert set(ours.tensors) == set(raw)
    for tensor in theirs.tensors:
        mine = ours.tensors[tensor.name]
        assert mine.shape == tuple(int(v) for v in tensor.shape)[::-1]
        assert mine.type_name == tensor.tensor_type.name
        assert np.array_equal(mine.data, np.asarray(tensor.data).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("damage", ["not a gguf", "header cut short", "data cut short"])
def test_a_file_that_is_no_whole_gguf_is_refused_naming_what_is_wrong(tmp_path, damage):
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", np.ones((64, 64), np.float32))
    finish(writer)
    data = path.read_bytes()
    if damage == "not a gguf":
        path.write_bytes(b"GGML" + data[4:])
        with pytest.raises(ValueError, match="is not a GGUF file"):
            GgufFile(path)
    elif damage == "header cut short":
        path.write_bytes(data[:40])
        with pytest.raises(ValueError, match="ends inside its GGUF header"):
            GgufFile(path)
    else:
        path.write_bytes(data[: len(data) - 100])
        with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight ends at byte \d+, past"):
            GgufFile(path)


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
def test_a_damaged_gguf_leaves_every_projection_to_int8_from_the_models_weights(
    tokenizer, tmp_path, caplog
):
    model = gguf_model(tokenizer, tmp_path)
    path = tmp_path / "model.gguf"
    path.write_bytes(path.read_bytes()[:-1000])
    done = quantize_model(model, "gguf", gguf=path)
    assert done["mode"] == "gguf"
    assert f"{path} cannot be read" in caplog.text and "past the file's end" in caplog.text
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 15 and {m.mode for m in layers} == {"int8"}


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
def test_a_sample_of_rows_puts_q_and_k_in_order_and_tells_other_values_apart(
    tokenizer, tmp_path, monkeypatch, caplog
):
    model = gguf_model(tokenizer, tmp_path)
    names = [f"model.layers.1.self_attn.{part}" for part in ("q_proj", "k_proj", "v_proj")]
    assert gguf_packs.SAMPLE_ROWS >= 256  # every row of these: the whole check
    whole = GgufPacks(tmp_path / "model.gguf")
    expected = {name: whole.pack(name, model.get_submodule(name).weight, dict) for name in names}
    monkeypatch.setattr(gguf_packs, "SAMPLE_ROWS", 16)
    sampled = GgufPacks(tmp_path / "model.gguf")
    for name in names:
        mode, packs = sampled.pack(name, model.get_submodule(name).weight, dict)
        assert mode == expected[name][0] == "int4"
        assert torch.equal(packs["qweight"], expected[name][1]["qweight"]), name
        assert torch.equal(packs["scales"], expected[name][1]["scales"]), name
    other = torch.randn(256, 256) * 0.05
    mode, packed = sampled.pack(names[0], other, lambda w: {"qweight": w})
    assert mode == "int8" and packed["qweight"] is other
    # The right values, rows moved by one: in neither order the packs know.
    shuffled = model.get_submodule(names[0]).weight.detach().roll(1, dims=0)
    mode, packed = sampled.pack(names[0], shuffled, lambda w: {"qweight": w})
    assert mode == "int8" and packed["qweight"] is shuffled


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
def test_q6_k_tensors_decode_from_their_blocks_and_keep_gemm_blocks_but_the_vocabulary(tmp_path):
    writer = GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    weights = {}
    for module, (n, k) in {"lm_head": (40, 256), "model.layers.0.mlp.down_proj": (24, 512)}.items():
        raw = q6_k_blocks(n, k, seed=n)
        weights[module] = torch.from_numpy(quants.dequantize(raw, Q6_K)).float()
        writer.add_tensor(gguf_name(module), raw, raw_dtype=Q6_K)
    finish(writer)
    packs = GgufPacks(tmp_path / "model.gguf")
    quantize = lambda w: QuantizedLinear.quantize(w, "int8", 32)  # noqa: E731
    mode, down = packs.pack(
        "model.layers.0.mlp.down_proj", weights["model.layers.0.mlp.down_proj"], quantize
    )
    assert mode == "q6k" and set(down) == {"qweight", "scales", *GEMM_PACKS}
    assert torch.equal(dequantize_q6_k(down), weights["model.layers.0.mlp.down_proj"])
    expanded = torch.empty(24, 512)
    qmatmul.int6_dequantize(down["qweight"], down["scales"], expanded)
    assert torch.equal(expanded, weights["model.layers.0.mlp.down_proj"])
    # It multiplies one row a sequence, never on the prefill GEMM: no blocks to keep.
    mode, vocabulary = packs.pack("lm_head", weights["lm_head"], quantize)
    assert mode == "q6k" and set(vocabulary) == {"qweight", "scales"}


@pytest.mark.skipif(not KERNELS, reason="ragqa's kernels did not build here")
def test_q6_k_q_rows_llama_cpp_interleaved_come_back_in_model_order_for_decode_and_gemm(
    tmp_path,
):
    writer = GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    weights = {}
    for part, n in {"q_proj": 256, "k_proj": 128, "v_proj": 128}.items():
        module = f"model.layers.0.self_attn.{part}"
        raw = q6_k_blocks(n, 256, seed=n + len(part))
        values = torch.from_numpy(quants.dequantize(raw, Q6_K)).float()
        if part != "v_proj":
            heads = 4 if part == "q_proj" else 2
            values = values.reshape(heads, n // heads // 2, 2, 256).transpose(1, 2).reshape(n, 256)
        weights[module] = values
        writer.add_tensor(gguf_name(module), raw, raw_dtype=Q6_K)
    finish(writer)
    packs = GgufPacks(tmp_path / "model.gguf")
    for module, weight in weights.items():
        mode, packed = packs.pack(module, weight, dict)
        assert mode == "q6k", module
        expanded = torch.empty(weight.shape)
        qmatmul.int6_dequantize(packed["qweight"], packed["scales"], expanded)
        assert torch.equal(expanded, weight), module
        assert torch.equal(dequantize_q6_k(packed), weight), module
