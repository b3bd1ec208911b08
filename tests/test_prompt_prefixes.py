"""Start-up caching of the prompt prefixes every question shares."""

import pytest
from transformers import AutoTokenizer

from app.answer import warm_prompt_prefixes
from generation.engine import Engine
from generation.provision import pull_preset
from retrieval.answerable import check_messages
from retrieval.prompt import build_prompt
from tests import docs
from tests.conftest import MODEL_DIR, tiny_llama


@pytest.fixture()
def engine():
    """A random-weight 2-layer Llama with the real SmolLM2 tokenizer (its chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(pull_preset("smollm2-135m-instruct", MODEL_DIR).path)
    return Engine(tiny_llama(tokenizer), tokenizer, name="tiny")


def _question_ids(engine: Engine, question: str, lang: str) -> list[int]:
    passages = [docs.passage(1, "The Zorblax engine runs on liquid nitrogen.")]
    prompt = build_prompt(
        question, passages, count_tokens=lambda t: len(t.split()), budget_tokens=2000, lang=lang
    )
    return engine.chat_ids(prompt.messages)


@pytest.mark.parametrize("check", [True, False])
def test_the_first_question_reuses_the_prefixes_cached_at_start_up(engine, check):
    cached = warm_prompt_prefixes(engine, check=check)

    assert set(cached) == ({"en", "zh", "check"} if check else {"en", "zh"})
    for lang, question in (("en", "What does the engine run on?"), ("zh", "发动机用什么燃料？")):
        _, _, reused = engine.prefill_with_prefix(_question_ids(engine, question, lang))
        assert reused == cached[lang] > 20, lang  # the whole system turn
    check_ids = engine.chat_ids(check_messages("What does it run on?", "It runs on nitrogen."))
    _, _, reused = engine.prefill_with_prefix(check_ids)
    if check:
        assert reused == cached["check"] > 200  # instructions and worked examples
    else:
        assert reused < 200  # only what it shares with a system turn, if anything


def test_a_failed_prefix_warm_up_still_leaves_the_generator_ready(settings_factory, monkeypatch):
    from app import generator
    from app.services import ComponentStatus, Services

    def broken(engine, *, check):
        raise ValueError("this chat template has no system role")

    monkeypatch.setattr(generator, "warm_prompt_prefixes", broken)
    status = ComponentStatus("generator")
    services = Services(
        settings=settings_factory(),
        engine=None,  # type: ignore[arg-type]  (the database engine: not used here)
        sessions=None,  # type: ignore[arg-type]
        generator_status=status,
        embedder_status=ComponentStatus("embedder"),
    )
    generator.load_generator(services)
    try:
        assert status.state == "ready", status.detail
    finally:
        generator.stop_generator(services)
