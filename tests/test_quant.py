"""Weight-only quantization: kernels against a float reference, engine output, weight cache."""

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from generation import qmatmul
from generation.device import cpu_has_amx, split_dtypes
from generation.engine import Engine
from generation.params import GenerationParams
from generation.provision import pull_preset
from generation.quant import (
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8_blocks,
    quantize_by_rows,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
    resolve_mode,
)
from generation.quant_load import (
    SOURCE_KEY,
    cache_path,
    choose_prefill_weights,
    integer_prefill_pays,
    quantize_model,
)
from generation.siblings import fuse_module
from tests.conftest import MODEL_DIR, tiny_llama


@pytest.fixture
def kernels():
    if not qmatmul.load():
        pytest.skip("ragqa's kernels do not build here (no AVX2 or no compiler)")


def _linear(n=96, k=256, bias=True):
    torch.manual_seed(0)
    layer = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return layer


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_matches_float_reference_within_error_bound(mode):
    dense = _linear()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    reference = (x.float() @ dense.weight.float().T) + dense.bias.float()
    q = QuantizedLinear(dense, mode, group_size=64)
    y = q(x).float()
    # int8 per channel keeps ~0.4% of the weight range per element; int4 groups ~7%
    rel = (y - reference).abs().max() / reference.abs().max()
    assert rel < (0.02 if mode == "int8" else 0.12), rel


def test_int8_and_int4_kernels_equal_their_own_dequantized_weights():
    dense = _linear(bias=False)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    q8, s8 = quantize_int8_blocks(dense.weight)
    ref8 = x.float() @ dequantize_int8_blocks(q8, s8).T
    y8 = QuantizedLinear(dense, "int8")(x).float()
    assert (y8 - ref8).abs().max() < 0.05 * ref8.abs().max()
    q4, sz = quantize_int4(dense.weight, 64)
    ref4 = x.float() @ dequantize_int4(q4, sz, 64).T
    y4 = QuantizedLinear(dense, "int4", group_size=64)(x).float()
    assert (y4 - ref4).abs().max() < 0.05 * ref4.abs().max()


def test_many_rows_take_the_bf16_path_exactly():
    dense = _linear()
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    q = QuantizedLinear(dense, "int4", prefill_rows=16)
    assert torch.equal(q(x), dense(x))


def test_prefill_weights_are_column_major_with_the_same_values_and_the_tied_embedding_kept():
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    model = tiny_llama(tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in Qwen2.5 0.5B
    reference = tiny_llama(tokenizer)
    reference.lm_head.weight = reference.model.embed_tokens.weight
    quantize_model(model, "int8")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear)
    n = q_proj.out_features
    assert q_proj.weight.stride() == (1, n)
    assert torch.equal(q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.is_contiguous()
    # 40 rows take the float weights everywhere: the same logits as the unquantized model.
    ids = torch.tensor([list(range(5, 45))])
    with torch.inference_mode():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bf16_model_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tinyq")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _engine_greedy(engine, ids, n=12):
    return engine.generate(ids, GenerationParams(max_new_tokens=n, ignore_eos=True)).token_ids


def _hf_greedy(engine, ids, n=12):
    """transformers' generate() on the engine's own (quantized) model, greedy, n tokens."""
    return engine.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=engine.tokenizer.eos_token_id,
    )[0][len(ids) :].tolist()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_greedy_with_quantization_matches_hf_generate_on_same_model(
    tiny_bf16_model_dir, mode
):
    engine, report = Engine.load(tiny_bf16_model_dir, dtype="bfloat16", quantization=mode)
    assert report.quantization == mode
    assert any(isinstance(m, QuantizedLinear) for m in engine.model.modules())
    ids = engine.chat_ids([{"role": "user", "content": "Say something about rivers."}])
    assert _engine_greedy(engine, ids) == _hf_greedy(engine, ids)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_second_load_reads_cached_weights_instead_of_requantizing(tiny_bf16_model_dir, mode):
    cache = cache_path(tiny_bf16_model_dir, mode, 64)
    cache.unlink(missing_ok=True)
    first = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.bfloat16)
    info1 = quantize_model(first, mode, cache=cache)
    assert info1["from_cache"] is False and cache.exists()
    mtime = cache.stat().st_mtime_ns
    second = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.bfloat16)
    info2 = quantize_model(second, mode, cache=cache)
    assert info2["from_cache"] is True and cache.stat().st_mtime_ns == mtime
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(first(x).logits, second(x).logits)


def _packs(model):
    return {
        name: (m.qweight, m.scales)
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }


def test_the_cache_stores_int4_values_two_to_a_byte_and_reads_caches_of_one_a_byte(
    kernels, tiny_bf16_model_dir
):
    cache = cache_path(tiny_bf16_model_dir, "int4", 64)
    cache.unlink(missing_ok=True)
    first = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.bfloat16)
    quantize_model(first, "int4", cache=cache)
    stored = load_file(str(cache))
    widths = {
        name: m.in_features for name, m in first.named_modules() if isinstance(m, QuantizedLinear)
    }
    assert len(widths) == 2 * 7 + 1
    for name, k in widths.items():
        assert stored[f"{name}.qweight"].shape[1] == k // 2, name
    second = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.bfloat16)
    assert quantize_model(second, "int4", cache=cache)["from_cache"] is True
    # A cache written before: one value a byte. Read as it is, not quantized afresh.
    with safe_open(str(cache), framework="pt") as f:
        metadata = f.metadata()
    wide = {
        key: qmatmul.unpack_nibbles(value) if key.endswith(".qweight") else value
        for key, value in stored.items()
    }
    save_file(wide, str(cache), metadata=metadata)
    third = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.bfloat16)
    assert quantize_model(third, "int4", cache=cache)["from_cache"] is True
    reference = _packs(first)
    for model in (second, third):
        for name, (q, scales) in _packs(model).items():
            assert torch.equal(q, reference[name][0]) and torch.equal(scales, reference[name][1])


def test_packs_read_from_the_cache_do_not_keep_the_file_mapped(tiny_bf16_model_dir):
    # A mapped cache stays resident until its last pack dies, so packs moved onto huge
    # pages one by one were not freed until all had moved.
    cache = cache_path(tiny_bf16_model_dir, "int8", 64)
    quantize_model(LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir), "int8", cache=cache)
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    assert quantize_model(model, "int8", cache=cache)["from_cache"] is True
    assert str(cache) not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("damage", ["missing layers", "not safetensors"])
def test_an_incomplete_or_unreadable_cache_is_quantized_afresh_and_rewritten(
    tiny_bf16_model_dir, damage
):
    cache = cache_path(tiny_bf16_model_dir, "int8", 64)
    reference = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    quantize_model(reference, "int8", cache=cache)
    if damage == "missing layers":
        kept = {k: v for k, v in load_file(str(cache)).items() if ".layers.0." not in k}
        save_file(kept, str(cache))
    else:
        cache.write_bytes(b"not a safetensors file")
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    assert quantize_model(model, "int8", cache=cache)["from_cache"] is False
    again = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    assert quantize_model(again, "int8", cache=cache)["from_cache"] is True
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(x).logits, reference(x).logits)
    assert torch.equal(again(x).logits, reference(x).logits)


def test_a_cache_that_names_no_source_or_another_is_quantized_afresh(tiny_bf16_model_dir):
    cache = cache_path(tiny_bf16_model_dir, "int8", 64)
    cache.unlink(missing_ok=True)
    quantize_model(LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir), "int8", cache=cache)
    with safe_open(str(cache), framework="pt") as f:  # as caches were written before sources
        assert SOURCE_KEY not in (f.metadata() or {})
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    assert quantize_model(model, "int8", cache=cache, source="a")["from_cache"] is False
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    assert quantize_model(model, "int8", cache=cache, source="a")["from_cache"] is True
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    assert quantize_model(model, "int8", cache=cache, source="b")["from_cache"] is False


def test_a_checkpoint_replaced_by_other_weights_is_quantized_afresh_not_read_from_the_cache(
    kernels, tiny_bf16_model_dir, tmp_path, caplog
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bf16_model_dir, folder, ignore=shutil.ignore_patterns("ragqa-quant-*"))
    Engine.load(folder, dtype="bfloat16", quantization="int8")
    cache = cache_path(folder, "int8", 64)
    with safe_open(str(cache), framework="pt") as f:
        assert f.metadata()[SOURCE_KEY].startswith("model.safetensors:")
    # The folder provisioned anew: other weights of the same shapes, in a new file.
    torch.manual_seed(1)
    config = LlamaConfig.from_pretrained(folder)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "new")
    os.replace(tmp_path / "new" / "model.safetensors", folder / "model.safetensors")
    caplog.set_level(logging.WARNING, logger="generation.quant_load")
    engine, _ = Engine.load(folder, dtype="bfloat16", quantization="int8")
    assert "was packed from" in caplog.text
    expected = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    quantize_model(expected, "int8")
    compared = 0
    for (name, a), (_, b) in zip(
        engine.model.named_modules(), expected.named_modules(), strict=True
    ):
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales), name
            compared += 1
    assert compared == 2 * 7 + 1  # every projection of both layers, and the vocabulary's


def test_fusing_a_module_twice_keeps_its_first_group(kernels, tiny_bf16_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir)
    quantize_model(model, "int8")
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.siblings
    assert group is not None and fuse_module(attention) == 0
    assert attention.q_proj.siblings is group


@pytest.mark.parametrize("mode", ["int8", "int8 per row", "int4"])
def test_quantizing_by_row_chunks_gives_the_same_packs_as_the_whole_weight(mode):
    torch.manual_seed(0)
    weight = torch.randn(300, 128, dtype=torch.bfloat16)  # 7 chunks of 48 rows, one short
    quantize, scale_dim = {
        "int8": (quantize_int8_blocks, 0),
        "int8 per row": (quantize_int8, 0),
        "int4": (lambda w: quantize_int4(w, 64), 1),
    }[mode]
    q, scales = quantize_by_rows(weight, quantize, scale_dim, chunk_values=48 * 128)
    whole_q, whole_scales = quantize(weight)
    assert torch.equal(q, whole_q) and torch.equal(scales, whole_scales)


def test_unknown_quantization_mode_names_the_choices():
    with pytest.raises(
        ValueError, match=r"quantization must be one of \('none', 'int8', 'int4', 'gguf'\)"
    ):
        quantize_model(nn.Sequential(), "int3")


def test_auto_quantization_is_int8_on_a_cpu_where_the_kernels_build_and_no_gguf_is_at_hand(
    tiny_bf16_model_dir,
):
    from generation import qmatmul

    if not qmatmul.load():
        pytest.skip("ragqa's int8 kernels do not build on this machine (no AVX2 or compiler)")
    engine, report = Engine.load(tiny_bf16_model_dir, dtype="bfloat16", quantization="auto")
    assert report.quantization == "int8"
    assert any(isinstance(m, QuantizedLinear) for m in engine.model.modules())


def test_auto_quantization_keeps_float_weights_without_the_kernels_or_off_the_cpu(monkeypatch):
    from generation import qmatmul

    monkeypatch.setattr(qmatmul, "load", lambda: False)
    assert resolve_mode("auto", torch.device("cpu")) == "none"
    monkeypatch.setattr(qmatmul, "load", lambda: True)
    assert resolve_mode("auto", torch.device("cuda")) == "none"
    assert resolve_mode("int4", torch.device("cpu")) == "int4"  # an explicit mode is kept
    assert resolve_mode("auto", torch.device("cpu")) == "int8"  # no GGUF at hand
    assert resolve_mode("auto", torch.device("cpu"), has_gguf=True) == "gguf"
    assert resolve_mode("auto", torch.device("cuda"), has_gguf=True) == "none"
    with pytest.raises(
        ValueError, match=r"one of \('auto', 'none', 'int8', 'int4', 'gguf'\), got 'fast'"
    ):
        resolve_mode("fast", torch.device("cpu"))


def test_expanding_packed_weights_gives_the_values_the_kernels_multiply(kernels):
    torch.manual_seed(0)
    w = torch.randn(40, 256)
    q8, s8 = quantize_int8_blocks(w)
    out = torch.empty(40, 256)
    qmatmul.int8_dequantize(q8, s8.half(), out)
    assert torch.equal(out, dequantize_int8_blocks(q8, s8.half()).float())
    q4, sz = quantize_int4(w, 64)
    qs, sm = qmatmul.pack_int4(q4, sz)
    qmatmul.int4_dequantize(qs, sm, 64, out)
    # The int4 kernel's own form: w = q * s + m with float16 s and m per group of 64.
    s, m = (sm[..., i].float().repeat_interleave(64, dim=1) for i in (0, 1))
    torch.testing.assert_close(out, q4.float() * s + m, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="out must be a contiguous float32 tensor of 10240"):
        qmatmul.int8_dequantize(q8, s8.half(), torch.empty(40, 255))


def _rounded_reference(tokenizer):
    """tiny_llama with every decoder layer's weight rounded as int8 per block of 32."""
    model = tiny_llama(tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.model.layers.modules():
        if isinstance(module, nn.Linear):
            q, scales = quantize_int8_blocks(module.weight.detach())
            module.weight.data = dequantize_int8_blocks(q, scales.half()).float()
    return model


def test_quantized_prefill_frees_the_float_weights_and_multiplies_the_rounded_ones(kernels):
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    model = tiny_llama(tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in Qwen2.5 0.5B
    kept = tiny_llama(tokenizer)
    kept.lm_head.weight = kept.model.embed_tokens.weight
    info = quantize_model(model, "int8", prefill_weights="quantized")
    quantize_model(kept, "int8", prefill_weights="float")
    assert info["prefill_weights"] == "quantized" and info["fused_groups"] == 4
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.weight is None for m in layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # costs nothing: kept
    long_ids, short_ids = torch.tensor([list(range(5, 45))]), torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        # 40 rows: float GEMMs over the expanded int8 weights, as the rounded model does.
        torch.testing.assert_close(
            model(long_ids).logits,
            _rounded_reference(tokenizer)(long_ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )
        # 3 rows take the int8 kernels whichever weights prefill uses.
        assert torch.equal(model(short_ids).logits, kept(short_ids).logits)


def test_integer_prefill_frees_the_int4_floats_and_multiplies_packs_by_int8_activations(kernels):
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    model, expanded = tiny_llama(tokenizer), tiny_llama(tokenizer)
    info = quantize_model(model, "int4", group_size=32, prefill_weights="integer")
    quantize_model(expanded, "int4", group_size=32, prefill_weights="quantized")
    assert info["prefill_weights"] == "integer"
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.weight is None and m.gemm for m in layers)
    long_ids, short_ids = torch.tensor([list(range(5, 45))]), torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        # 40 rows: the same int4 weights, the activations rounded to int8 per block of 32
        # (at most 1/254 of a block's largest value each) instead of exact, through two
        # layers of a random model: 2 % of the largest logit on this seed.
        ours, reference = model(long_ids).logits, expanded(long_ids).logits
        assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
        assert not torch.equal(ours, reference)
        # 3 rows take the decode kernels whatever prefill uses.
        assert torch.equal(model(short_ids).logits, expanded(short_ids).logits)


def test_integer_prefill_of_int8_packs_keeps_their_float_weights_and_says_so(kernels):
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    model = tiny_llama(tokenizer)
    info = quantize_model(model, "int8", prefill_weights="integer")
    assert info["prefill_weights"] == "float"
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.weight is not None and not m.gemm for m in layers)


def test_engine_with_integer_prefill_reports_it_and_decodes_as_generate_does(
    tiny_bf16_model_dir, kernels
):
    engine, report = Engine.load(
        tiny_bf16_model_dir,
        dtype="float32",
        quantization="int4",
        group_size=32,
        prefill_weights="integer",
    )
    assert report.prefill_weights == "integer" and report.prefill_dtype == "float32"
    ids = engine.chat_ids([{"role": "user", "content": "Say something long about rivers."}])
    assert len(ids) > 16  # the prompt takes the GEMM
    assert _engine_greedy(engine, ids) == _hf_greedy(engine, ids)


def test_auto_takes_the_integer_prefill_for_int4_and_gguf_unless_bfloat16_runs_on_amx():
    f32, bf16 = torch.float32, torch.bfloat16
    for mode in ("int4", "gguf"):
        assert integer_prefill_pays(mode, f32, on_kernels=True, amx=False)
        assert integer_prefill_pays(mode, f32, on_kernels=True, amx=True)
        assert integer_prefill_pays(mode, bf16, on_kernels=True, amx=False)  # Zen 4, Zen 5
        assert not integer_prefill_pays(mode, bf16, on_kernels=True, amx=True)
        assert not integer_prefill_pays(mode, f32, on_kernels=False, amx=False)
    # int8 packs hold values the integer GEMM refuses; none has no packs at all
    assert not integer_prefill_pays("int8", f32, on_kernels=True, amx=False)
    assert not integer_prefill_pays("none", bf16, on_kernels=True, amx=False)
    assert not integer_prefill_pays("gguf", torch.float16, on_kernels=True, amx=False)


def test_auto_prefill_weights_keeps_floats_only_when_they_take_half_the_memory_or_less():
    assert choose_prefill_weights("auto", 5, 10) == "float"
    assert choose_prefill_weights("auto", 6, 10) == "quantized"
    assert choose_prefill_weights("auto", 6, None) == "float"  # unknown: the faster one
    assert choose_prefill_weights("quantized", 1, 10**12) == "quantized"
    assert choose_prefill_weights("float", 10**12, 1) == "float"
    # where the integer GEMM applies, auto takes it whatever the memory; asked ones stay
    assert choose_prefill_weights("auto", 5, 10, integer=True) == "integer"
    assert choose_prefill_weights("auto", 6, 10, integer=True) == "integer"
    assert choose_prefill_weights("float", 5, 10, integer=True) == "float"
    with pytest.raises(
        ValueError, match=r"one of \('auto', 'float', 'quantized', 'integer'\), got 'int8'"
    ):
        choose_prefill_weights("int8", 1, 1)


def test_engine_with_quantized_prefill_reports_it_and_decodes_as_generate_does(
    tiny_bf16_model_dir, kernels
):
    engine, report = Engine.load(
        tiny_bf16_model_dir, dtype="float32", quantization="int8", prefill_weights="quantized"
    )
    assert report.prefill_weights == "quantized"
    ids = engine.chat_ids([{"role": "user", "content": "Say something long about rivers."}])
    assert len(ids) > 16  # the prompt takes the expanded weights
    assert _engine_greedy(engine, ids) == _hf_greedy(engine, ids)


def _record_load_dtypes(monkeypatch) -> list:
    """The dtype of each from_pretrained call Engine.load makes from now on."""
    from generation import engine as engine_module

    loaded = []
    real = engine_module.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        loaded.append(kwargs["dtype"])
        return real(path, **kwargs)

    monkeypatch.setattr(engine_module.AutoModelForCausalLM, "from_pretrained", spy)
    return loaded


@pytest.mark.parametrize("prefill_weights", ["quantized", "float"])
def test_a_narrow_checkpoint_loads_narrow_and_widens_to_the_same_float32_model(
    tiny_bf16_model_dir, kernels, monkeypatch, prefill_weights
):
    from generation import engine as engine_module

    def load():
        engine, _ = Engine.load(
            tiny_bf16_model_dir,
            dtype="float32",
            quantization="int8",
            prefill_weights=prefill_weights,
        )
        return engine

    loaded = _record_load_dtypes(monkeypatch)
    narrow = load()
    real_weights = engine_module.checkpoint_weights
    monkeypatch.setattr(
        engine_module, "checkpoint_weights", lambda folder: (None, real_weights(folder)[1])
    )
    wide = load()
    assert loaded == [torch.bfloat16, torch.float32]
    assert {p.dtype for p in narrow.model.parameters()} == {torch.float32}
    # 40 rows: the float copies (column-major) or the expanded packs, in float32 either way.
    down = narrow.model.model.layers[0].mlp.down_proj
    assert (down.weight is None) == (prefill_weights == "quantized")
    if down.weight is not None:
        assert down.weight.stride() == (1, down.out_features)
    ids = torch.tensor([list(range(5, 45))])
    with torch.inference_mode():
        assert torch.equal(narrow.model(ids).logits, wide.model(ids).logits)


# In bfloat16 on AMX tiles the float GEMM keeps the prefill (integer_prefill_pays).
@pytest.mark.parametrize(
    ("dtype", "quantization", "expected"),
    [
        ("float32", "int4", "integer"),
        ("float32", "int8", "float"),
        ("bfloat16", "int4", "float" if cpu_has_amx() else "integer"),
    ],
)
def test_auto_prefill_weights_take_the_integer_gemm_for_int4_packs_unless_bfloat16_has_amx(
    tiny_bf16_model_dir, kernels, dtype, quantization, expected
):
    _, report = Engine.load(
        tiny_bf16_model_dir,
        dtype=dtype,
        quantization=quantization,
        group_size=32,
        prefill_weights="auto",
    )
    assert report.prefill_dtype == dtype
    assert report.prefill_weights == expected


def test_auto_prefill_weights_follow_the_memory_available_before_loading(
    tiny_bf16_model_dir, kernels, monkeypatch
):
    from generation import engine as engine_module

    def load_with(available):
        monkeypatch.setattr(engine_module, "available_memory", lambda: available)
        _, report = Engine.load(
            tiny_bf16_model_dir, dtype="float32", quantization="int8", prefill_weights="auto"
        )
        return report.prefill_weights

    # Its matrices other than the embedding and lm_head hold 294,912 values: 1.125 MiB as
    # float32, kept when at least twice that is available.
    assert load_with(4 * 2**20) == "float"
    assert load_with(2 * 2**20) == "quantized"


@pytest.mark.parametrize("prefill_weights", ["float", "quantized"])
def test_an_untied_vocabulary_projection_keeps_no_float_weight_and_takes_any_rows_packed(
    tiny_bf16_model_dir, kernels, prefill_weights
):
    model = LlamaForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.float32)
    float_head = model.lm_head.weight.detach().clone()
    quantize_model(model, "int8", prefill_weights=prefill_weights)
    head = model.lm_head
    assert isinstance(head, QuantizedLinear)
    assert head.weight is None and head.scratch is None
    # The other projections keep what prefill_weights asks for.
    assert (model.model.layers[0].mlp.down_proj.weight is None) == (prefill_weights == "quantized")
    # More rows than prefill_rows (a batch of 40 sequences' decode steps) take the kernel,
    # which gives each row what it gives that row alone.
    torch.manual_seed(0)
    x = torch.randn(40, 128)
    logits = head(x)
    assert torch.equal(logits, torch.cat([head(x[i : i + 1]) for i in range(40)]))
    reference = x @ float_head.T
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()


def test_split_dtypes_computes_in_float32_and_prefills_in_bf16_only_for_auto_int8_int4_kernels():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert split_dtypes(cpu, "auto", bf16, True, "int8") == (fp32, bf16)
    assert split_dtypes(cpu, "auto", bf16, True, "int4") == (fp32, bf16)
    # gguf keeps the unquantized model's bf16 prefill arithmetic (the identity measure)
    assert split_dtypes(cpu, "auto", bf16, True, "gguf") == (bf16, bf16)
    assert split_dtypes(cpu, "auto", bf16, False, "int8") == (bf16, bf16)  # torch's kernels
    assert split_dtypes(cpu, "bfloat16", bf16, True, "int8") == (bf16, bf16)  # asked for: kept
    assert split_dtypes(cpu, "auto", fp32, True, "gguf") == (fp32, fp32)  # no fast bf16 here
    assert split_dtypes(cuda, "auto", bf16, True, "int8") == (bf16, bf16)


def test_bf16_prefill_weights_in_a_float32_model_multiply_in_bf16_then_add_the_bias():
    dense = _linear()
    q = QuantizedLinear(dense, "int8", prefill_rows=16, dtype=torch.float32)
    q.bias = nn.Parameter(dense.bias.detach().float(), requires_grad=False)
    x = torch.randn(40, 256)
    expected = F.linear(x.bfloat16(), dense.weight).float() + q.bias
    assert torch.equal(q(x), expected)
    assert q(x).dtype == torch.float32


def _load_with_bf16_cpu(folder, monkeypatch, **kwargs):
    """Engine.load as on a CPU with AVX-512-BF16, whatever this one has, and the dtypes
    from_pretrained loaded in."""
    from generation import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: True)
    loaded = _record_load_dtypes(monkeypatch)
    engine, report = Engine.load(folder, **kwargs)
    return engine, report, loaded


def test_auto_dtype_on_a_bf16_cpu_decodes_quantized_in_float32_and_prefills_in_bf16(
    tiny_bf16_model_dir, kernels, monkeypatch
):
    engine, report, loaded = _load_with_bf16_cpu(
        tiny_bf16_model_dir, monkeypatch, quantization="int8", prefill_weights="float"
    )
    assert (report.dtype, report.prefill_dtype) == ("float32", "bfloat16")
    assert loaded == [torch.bfloat16]  # the kept bf16 weights are the loaded ones
    projections = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    # 7 a layer and the untied lm_head, which keeps no float weight
    assert len(projections) == 15 and engine.model.lm_head.weight is None
    assert {m.weight.dtype for m in projections[:-1]} == {torch.bfloat16}
    kept = {id(m.weight) for m in projections[:-1]}
    others = [p for p in engine.model.parameters() if id(p) not in kept]  # norms, embedding
    assert {p.dtype for p in others} == {torch.float32}
    # Decode steps take the float32 C++ layer, which a bf16 model could not.
    assert [ly.fused is not None for ly in engine.lean.layers] == [True, True]
    ids = engine.chat_ids([{"role": "user", "content": "Say something long about rivers."}])
    assert len(ids) > 16  # the prompt takes the bf16 weights
    assert _engine_greedy(engine, ids) == _hf_greedy(engine, ids)


def test_auto_dtype_on_a_bf16_cpu_stays_bf16_when_asked_or_unquantized(
    tiny_bf16_model_dir, kernels, monkeypatch
):
    _, asked, _ = _load_with_bf16_cpu(
        tiny_bf16_model_dir, monkeypatch, dtype="bfloat16", quantization="int8"
    )
    _, unquantized, _ = _load_with_bf16_cpu(tiny_bf16_model_dir, monkeypatch, quantization="none")
    assert (asked.dtype, asked.prefill_dtype) == ("bfloat16", "bfloat16")
    assert (unquantized.dtype, unquantized.prefill_dtype) == ("bfloat16", "bfloat16")


def test_a_bf16_model_prefills_from_quantized_weights_expanded_in_float32(
    tiny_bf16_model_dir, kernels
):
    # Long prompts used to fail here: a bf16 activation against the float32 scratch.
    engine, report = Engine.load(
        tiny_bf16_model_dir, dtype="bfloat16", quantization="int8", prefill_weights="quantized"
    )
    assert (report.dtype, report.prefill_weights, report.prefill_dtype) == (
        "bfloat16",
        "quantized",
        "float32",
    )
    ids = engine.chat_ids([{"role": "user", "content": "Say something long about rivers."}])
    assert len(ids) > 16
    assert _engine_greedy(engine, ids) == _hf_greedy(engine, ids)


def test_integer_prefill_leaves_a_tied_vocabulary_projection_on_its_embedding(kernels):
    # It multiplies one row a sequence (the last position's logits), never on the GEMM: it
    # keeps the embedding it shares rather than going over to the packs for long calls.
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    model = tiny_llama(tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding = model.model.embed_tokens.weight
    quantize_model(model, "int4", group_size=32, prefill_weights="integer")
    assert not model.lm_head.gemm and model.lm_head.weight is embedding
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.gemm for m in layers)
