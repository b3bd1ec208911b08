"""The lean decode step against transformers' forward: the same floats, batched and padded."""

import pytest
import torch
from transformers import (
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from generation import lean_decode, qmatmul
from generation.engine import Engine
from generation.params import GenerationParams
from generation.provision import pull_preset
from generation.quant_load import quantize_model
from tests.conftest import MODEL_DIR, TINY_SIZES, tiny_llama

KERNELS = qmatmul.load()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)


def _engine(
    tokenizer, family: str, quantization: str, dtype: torch.dtype = torch.float32
) -> Engine:
    torch.manual_seed(0)
    if family == "llama":
        model = tiny_llama(tokenizer)
    elif family == "qwen2":  # biases on q/k/v, as in Qwen2.5
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **TINY_SIZES))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), head_dim=16, **TINY_SIZES))
    model = model.to(dtype).eval()
    if quantization != "none":
        quantize_model(model, quantization, group_size=32)
    return Engine(model, tokenizer, name=family)


def _padded_batch(engine: Engine, prompts: list[list[int]]):
    """Prefill each prompt alone, then left-pad the KVs into one batch (as the scheduler)."""
    firsts, kvs = [], []
    for ids in prompts:
        logits, kv = engine.prefill(ids)
        firsts.append(int(logits.argmax()))
        kvs.append(kv)
    longest = max(len(p) for p in prompts)
    kv = []
    for layer in range(len(kvs[0])):
        parts = []
        for which in (0, 1):
            rows = [k[layer][which] for k in kvs]  # each [1, Hkv, T_i, D]
            pad = [torch.nn.functional.pad(r, (0, 0, longest - r.shape[2], 0)) for r in rows]
            parts.append(torch.cat(pad))
        kv.append((parts[0], parts[1]))
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * (len(p) + 1) for p in prompts])
    positions = torch.tensor([len(p) for p in prompts])
    return torch.tensor(firsts), positions, mask, kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4", "int8-float-rows"])
def test_lean_step_gives_the_same_logits_and_kv_as_transformers_forward(
    tokenizer, family, quantization, dtype
):
    if quantization != "none" and not KERNELS:
        pytest.skip("ragqa's int8 kernel did not build here")
    engine = _engine(tokenizer, family, quantization.removesuffix("-float-rows"), dtype)
    assert engine.lean is not None
    if quantization == "int8-float-rows":
        # A batch above `prefill_rows` takes the float weights, in transformers' path too.
        for module in engine.model.modules():
            if hasattr(module, "prefill_rows"):
                module.prefill_rows = 1
    # With the kernels, the stacked q/k/v and gate/up path, each layer's small ops in C++
    # (csrc/decode_layer.cpp), in float32 and in bfloat16; without, one call per
    # projection, in Python.
    stacked = [(ly.stacked(ly.qkv, 2), ly.stacked(ly.gate_up, 2)) for ly in engine.lean.layers]
    assert stacked == [(quantization in ("int8", "int4"),) * 2] * 2
    assert [ly.fused is not None for ly in engine.lean.layers] == [quantization != "none"] * 2
    prompts = [tokenizer.encode(t) for t in ("A longer prompt about copper wires", "Short")]
    tokens, positions, mask, kv = _padded_batch(engine, prompts)
    lean_kv, hf_kv = kv, kv
    for _ in range(3):
        lean_logits, lean_kv = engine.lean(tokens, positions, mask, lean_kv)
        hf_logits, hf_kv = engine.hf_decode_step(tokens, positions, mask, hf_kv)
        assert lean_logits.shape == (2, len(tokenizer))
        assert torch.equal(lean_logits, hf_logits)
        for (lk, lv), (hk, hv) in zip(lean_kv, hf_kv, strict=True):
            assert torch.equal(lk, hk) and torch.equal(lv, hv)
        tokens = lean_logits.argmax(-1)
        positions = positions + 1
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_padding_is_masked_in_the_lean_step(tokenizer, quantization):
    # The padded row's logits must not depend on what sits in its padding (int8: in C++).
    if quantization != "none" and not KERNELS:
        pytest.skip("ragqa's int8 kernel did not build here")
    engine = _engine(tokenizer, "qwen2", quantization)
    prompts = [tokenizer.encode(t) for t in ("A longer prompt about copper wires", "Short")]
    tokens, positions, mask, kv = _padded_batch(engine, prompts)
    clean, _ = engine.lean(tokens, positions, mask, kv)
    pad = int((mask[1] == 0).sum())
    noisy_kv = [(k.clone(), v.clone()) for k, v in kv]
    for k, v in noisy_kv:
        k[1, :, :pad] = 5.0
        v[1, :, :pad] = -5.0
    noisy, _ = engine.lean(tokens, positions, mask, noisy_kv)
    assert torch.equal(clean, noisy)
    unmasked, _ = engine.lean(tokens, positions, torch.ones_like(mask), noisy_kv)
    assert not torch.allclose(unmasked[1], clean[1], atol=1e-4)


def test_a_model_the_lean_step_does_not_cover_keeps_transformers_forward(tokenizer):
    engine = _engine(tokenizer, "qwen3", "none")  # a type not covered (query/key norms)
    assert lean_decode.build(engine.model) is None and engine.lean is None
    ids = tokenizer.encode("Tell me about copper")
    result = engine.generate(ids, GenerationParams(max_new_tokens=6, ignore_eos=True))
    assert len(result.token_ids) == 6


def test_a_head_size_the_attention_kernel_cannot_take_keeps_the_python_layer(tokenizer):
    if not KERNELS:
        pytest.skip("ragqa's int8 kernel did not build here")
    torch.manual_seed(0)
    sizes = {**TINY_SIZES, "hidden_size": 96, "num_attention_heads": 8}  # head size 12
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **sizes)).eval()
    quantize_model(model, "int8", group_size=32)
    engine = Engine(model, tokenizer, name="qwen2-head-12")
    assert engine.lean is not None
    assert [ly.fused for ly in engine.lean.layers] == [None, None]
    ids = tokenizer.encode("Copper wires")
    logits, kv = engine.prefill(ids)
    step = (torch.tensor([int(logits.argmax())]), torch.tensor([len(ids)]))
    mask = torch.ones(1, len(ids) + 1, dtype=torch.long)
    lean, _ = engine.lean(*step, mask, kv)
    hf, _ = engine.hf_decode_step(*step, mask, kv)
    assert torch.equal(lean, hf)
