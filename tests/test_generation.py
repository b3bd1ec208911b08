"""The generation engine against references: HF generate, solo decoding, plain sampling code."""

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from generation import attention
from generation.engine import Engine
from generation.params import GenerationParams, ParamError
from generation.provision import pull_preset
from generation.sampling import apply_repetition_penalty, sample, top_k_filter, top_p_filter
from generation.scheduler import Scheduler
from generation.stream import StreamDecoder
from tests.conftest import MODEL_DIR, tiny_llama

PROMPTS = [
    "Tell me about the history of the printing press.",
    "Why is the sky blue?",
    "List three uses of copper in electronics and explain each briefly, please.",
    "解释一下光合作用的过程。",
]


@pytest.fixture(scope="module")
def small_path():
    return pull_preset("smollm2-135m-instruct", MODEL_DIR).path


@pytest.fixture(scope="module")
def tokenizer(small_path):
    return AutoTokenizer.from_pretrained(small_path)


@pytest.fixture(scope="module")
def tiny_engine(tokenizer):
    """A random-weight 2-layer Llama with the real SmolLM2 tokenizer, in fp32."""
    return Engine(tiny_llama(tokenizer), tokenizer, name="tiny")


@pytest.fixture(scope="module")
def small_engine(small_path):
    engine, _ = Engine.load(small_path, device="cpu", dtype="float32", name="smollm2")
    return engine


def _hf_greedy(engine, ids, n):
    """transformers' own loop with its own SDPA attention: the reference."""
    assert engine.model.config._attn_implementation == attention.NAME
    engine.model.set_attn_implementation("sdpa")
    try:
        out = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=sorted(engine.eos_ids),
            pad_token_id=engine.tokenizer.eos_token_id,
        )[0][len(ids) :].tolist()
    finally:
        attention.use_decode_attention(engine.model)
    return [t for t in out if t not in engine.eos_ids]


def test_decode_attention_matches_sdpa_with_grouped_heads_and_left_padding():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    query = torch.randn(2, 6, 1, 16)  # [B, Hq, 1, D]
    key, value = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)  # [B, Hkv, T, D]
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, :, :, :4] = False  # the second row is left-padded by 4
    ours, _ = attention.decode_attention(module, query, key, value, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == ref.shape == (2, 1, 6, 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    # Padding must matter: without the mask the padded row attends to 4 more positions.
    unmasked, _ = attention.decode_attention(module, query, key, value, None, scaling=0.25)
    assert not torch.allclose(unmasked[1], ref[1], atol=1e-3)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_kv_appends_in_place_only_into_buffers_it_allocated(inference_mode):
    from generation.kv import KV_SLACK, append_kv

    # The engine decodes under inference_mode, where views have no _base.
    with torch.inference_mode(inference_mode):
        _check_kv_append(KV_SLACK, append_kv)


def _check_kv_append(KV_SLACK, append_kv):
    prefix = torch.randn(1, 2, 5, 4)
    before = prefix.clone()
    first = append_kv(prefix[:, :, :3], torch.ones(1, 2, 1, 4))  # a view of a foreign tensor
    assert torch.equal(prefix, before)  # never written to
    second = append_kv(first, torch.full((1, 2, 1, 4), 2.0))
    assert second.data_ptr() == first.data_ptr()  # same buffer, written in place
    assert torch.equal(second[:, :, :3], prefix[:, :, :3])
    assert second[0, 0, 3, 0] == 1.0 and second[0, 0, 4, 0] == 2.0
    # A stale view (one step behind) is not extended in place: that would overwrite.
    stale = append_kv(first, torch.zeros(1, 2, 1, 4))
    assert stale.data_ptr() != first.data_ptr() and second[0, 0, 4, 0] == 2.0
    grown = second
    for _ in range(KV_SLACK):
        grown = append_kv(grown, torch.zeros(1, 2, 1, 4))
    assert grown.shape[2] == 5 + KV_SLACK and torch.equal(grown[:, :, :5], second)


@pytest.mark.parametrize("which", ["tiny_engine", "small_engine"])
def test_greedy_decode_matches_hf_generate(request, which):
    engine = request.getfixturevalue(which)
    for prompt in PROMPTS[:2]:
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        ours = engine.generate(ids, GenerationParams(max_new_tokens=24)).token_ids
        assert ours == _hf_greedy(engine, ids, 24)


def test_generation_without_kv_cache_gives_the_same_tokens(tiny_engine):
    ids = tiny_engine.chat_ids([{"role": "user", "content": PROMPTS[0]}])
    params = GenerationParams(max_new_tokens=12)
    cached = tiny_engine.generate(ids, params).token_ids
    assert tiny_engine.generate(ids, params, use_cache=False).token_ids == cached


def _run_concurrently(scheduler, prompts_ids, params, prefix_lens=None):
    async def main():
        async def one(i, ids):
            text, tokens = "", None
            async for ev in scheduler.stream(
                ids, params, cache_prefix_len=(prefix_lens or [0] * len(prompts_ids))[i]
            ):
                text += ev.delta
                if ev.done:
                    tokens = ev
            return text, tokens

        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts_ids)))

    return asyncio.run(main())


def test_batched_decoding_matches_decoding_each_alone(tiny_engine):
    params = GenerationParams(max_new_tokens=20)
    prompts = [tiny_engine.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    alone = [tiny_engine.generate(ids, params).text for ids in prompts]
    scheduler = Scheduler(tiny_engine, max_batch=8)
    scheduler.start()
    try:
        results = _run_concurrently(scheduler, prompts, params)
        assert scheduler.steps < sum(len(a) for a in alone)  # the rows really shared steps
    finally:
        scheduler.stop()
    assert [text for text, _ in results] == alone


def test_prefix_reuse_gives_the_same_tokens_as_cold(tiny_engine):
    system = "You answer questions about documents. Cite passages as [n]. " * 8
    prompts = [
        tiny_engine.chat_ids(
            [{"role": "system", "content": system}, {"role": "user", "content": q}]
        )
        for q in PROMPTS[:3]
    ]
    prefix = tiny_engine.chat_ids([{"role": "system", "content": system}])
    pairs = zip(prompts[0], prompts[1], strict=False)
    shared = next(i for i, (a, b) in enumerate(pairs) if a != b)
    assert shared > len(prefix) // 2
    params = GenerationParams(max_new_tokens=16)
    cold = [tiny_engine.generate(ids, params).text for ids in prompts]
    scheduler = Scheduler(tiny_engine)
    scheduler.start()
    try:
        first = _run_concurrently(scheduler, prompts[:1], params, [shared])
        rest = _run_concurrently(scheduler, prompts[1:], params, [shared, shared])
    finally:
        scheduler.stop()
    assert [t for t, _ in first + rest] == cold
    assert all(ev.cached_prompt_tokens == shared for _, ev in rest)


def test_leaving_the_stream_cancels_the_request_and_frees_its_row(tiny_engine):
    ids = tiny_engine.chat_ids([{"role": "user", "content": PROMPTS[0]}])
    scheduler = Scheduler(tiny_engine)
    scheduler.start()

    async def main():
        async for ev in scheduler.stream(ids, GenerationParams(max_new_tokens=2000)):
            if ev.delta:
                break

    try:
        asyncio.run(main())
        import time

        deadline = time.monotonic() + 10
        while scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active == 0
    finally:
        scheduler.stop()


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_engine):
    ids = tiny_engine.chat_ids([{"role": "user", "content": PROMPTS[1]}])
    p = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    a = tiny_engine.generate(ids, p).token_ids
    b = tiny_engine.generate(ids, p).token_ids
    c = tiny_engine.generate(ids, GenerationParams(max_new_tokens=16, temperature=1.0, seed=7))
    assert a == b and a != c.token_ids


def _ref_top_p(logits, p):
    probs = torch.softmax(logits, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, total = [], 0.0
    for i in order:
        keep.append(i)
        total += probs[i]
        if total >= p:
            break
    return {i for i in range(len(probs)) if i in keep}


def test_top_k_top_p_and_repetition_penalty_match_reference():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, -2.0, 1.5])
    kept = torch.isfinite(top_k_filter(logits, 3)).nonzero().flatten().tolist()
    assert set(kept) == {0, 3, 6}
    for p in (0.3, 0.6, 0.9, 0.99):
        kept = set(torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist())
        assert kept == _ref_top_p(logits, p), p
    penal = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert penal[0] == 1.0 and penal[1] == -2.0 and penal[3] == 3.0
    greedy = GenerationParams(repetition_penalty=2.0)
    assert sample(logits, greedy, torch.tensor([3]), None) == 0  # 3.0/2 < 2.0


def test_stream_decoder_reassembles_chinese_and_never_emits_partial_characters(tokenizer):
    text = "光合作用是植物利用阳光把水和二氧化碳变成糖的过程。🌱 Done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_holds_back_and_cuts_stop_strings(tokenizer):
    text = "The answer is 42. END OF ANSWER and more text"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tokenizer, stop=("END OF",))
    out = []
    for t in ids:
        out.append(decoder.push(t))
        if decoder.stopped:
            break
    out.append(decoder.flush())
    joined = "".join(out)
    assert decoder.stopped and joined == "The answer is 42. "
    assert not any("END" in d for d in out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"temperature": -1}, r"temperature must be in \[0, 5\], got -1"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be in \[1, 32768\], got 0"),
        ({"top_k": -3}, r"top_k must be an integer >= 0, got -3"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \(0, 10\], got 0"),
    ],
)
def test_invalid_params_name_parameter_range_and_value(kwargs, message):
    with pytest.raises(ParamError, match=message):
        GenerationParams(**kwargs)


def test_temperature_zero_is_greedy_and_drops_filters():
    p = GenerationParams(temperature=0, top_k=5, top_p=0.5, stop="x")
    assert p.greedy and p.top_k == 0 and p.top_p == 1.0 and p.stop == ("x",)
