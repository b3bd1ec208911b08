"""From a question to a cited answer or an honest refusal.

retrieve -> refuse early when the evidence is weak -> build the numbered prompt ->
generate (streamed) -> hold back the first sentence to catch a model refusal -> clean [n]
markers as text streams -> map markers to passages (or infer them) -> refuse answers that
no passage supports. Events: `delta` (text), one `citations`, then `done`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.concurrency import run_in_threadpool

from app.citations import Citation, MarkerFilter, cite, looks_like_refusal
from generation.engine import Engine
from generation.params import GenerationParams
from generation.scheduler import Scheduler
from retrieval.answerable import check_messages, evidence_sentences
from retrieval.prompt import REFUSAL, SYSTEM, build_prompt, condense_messages, language_of
from retrieval.retriever import Passage, RetrievalResult, Retriever

logger = logging.getLogger(__name__)

# The first sentence is held back until this many characters so a refusal is caught
# before any of it reaches the client.
_HOLD_CHARS = 48


@dataclass
class AskInput:
    question: str
    collection: str | None = None
    document_ids: list[int] | None = None
    top_k: int = 5
    params: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=256))
    history: list[dict[str, str]] = field(default_factory=list)  # earlier chat turns
    debug: bool = False


@dataclass
class AnswerEvent:
    kind: str  # "delta" | "citations" | "done"
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def citation_dict(c: Citation) -> dict[str, Any]:
    p = c.passage
    return {
        "number": c.number,
        "document_id": p.document_id,
        "filename": p.filename,
        "title": p.title,
        "page": p.page,
        "heading_path": p.heading_path,
        "char_start": p.char_start,
        "char_end": p.char_end,
        "chunk_id": p.chunk_id,
        "text": p.text,
        "score": round(p.score, 6),
        "dense_score": None if p.dense_score is None else round(p.dense_score, 4),
        "inferred": c.inferred,
    }


def passage_dict(n: int, p: Passage) -> dict[str, Any]:
    return {
        "number": n,
        "document_id": p.document_id,
        "filename": p.filename,
        "page": p.page,
        "chunk_id": p.chunk_id,
        "score": round(p.score, 6),
        "dense_score": p.dense_score,
        "lexical_score": p.lexical_score,
        "text": p.text,
    }


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def system_probe(engine: Engine, system: str, user: str) -> list[int]:
    return engine.chat_ids(
        [{"role": "system", "content": system}, {"role": "user", "content": user}]
    )


def warm_prompt_prefixes(engine: Engine, *, check: bool) -> dict[str, int]:
    """Prefill the prefixes every question shares into the engine's prefix cache.

    Each language's system turn and, with the answerability check on, the check's
    instructions and worked examples (428 tokens for Qwen2.5): without this the first
    question after start-up paid for them (1.5B int8 on a 2-core CPU: 34.7 s to the first
    token instead of 14.0 s). Run on the model thread, after the engine's own warm-up.
    Returns the tokens cached per prefix.
    """
    done: dict[str, int] = {}
    for lang, system in SYSTEM.items():
        ids = system_probe(engine, system, "x")
        n = shared_prefix(ids, system_probe(engine, system, "y"))
        engine.prefill_with_prefix(ids, n)
        done[lang] = n
    if check:
        n = check_prefix_len(engine)
        engine.prefill_with_prefix(engine.chat_ids(check_messages("a", "a")), n)
        done["check"] = n
    return done


def check_prefix_len(engine: Engine) -> int:
    """Tokens shared by every answerability check (system turn and examples)."""
    a = engine.chat_ids(check_messages("a", "a"))
    return shared_prefix(a, engine.chat_ids(check_messages("b", "b")))


class Answerer:
    def __init__(
        self,
        *,
        retriever: Retriever,
        engine: Engine,
        scheduler: Scheduler,
        refusal_threshold: float,
        answerable_threshold: float = 0.0,
        max_context_tokens: int = 4096,
    ) -> None:
        self.retriever = retriever
        self.engine = engine
        self.scheduler = scheduler
        self.refusal_threshold = refusal_threshold
        self.answerable_threshold = answerable_threshold
        self.max_context_tokens = max_context_tokens
        self._prefix_len: dict[str, int] = {}
        self._check_prefix: int | None = None

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def weak_evidence(self, result: RetrievalResult, lang: str) -> bool:
        if not result.passages:
            return True
        if lang == "zh":
            # An English-only embedder scores Chinese text low across the board; there the
            # lexical match is the evidence.
            return not any((p.lexical_score or 0) > 0 for p in result.passages)
        return result.max_dense < self.refusal_threshold

    def _cache_prefix(self, ids: list[int], system: str, lang: str) -> int:
        """Tokens shared by every prompt in this language (the system turn)."""
        if lang not in self._prefix_len:
            self._prefix_len[lang] = shared_prefix(system_probe(self.engine, system, "x"), ids)
        return self._prefix_len[lang]

    def check_prefix(self) -> int:
        """Tokens shared by every answerability check (see `check_prefix_len`)."""
        if self._check_prefix is None:
            self._check_prefix = check_prefix_len(self.engine)
        return self._check_prefix

    async def _standalone(self, inp: AskInput, lang: str) -> str:
        if not inp.history:
            return inp.question
        messages = condense_messages(
            [*inp.history, {"role": "user", "content": inp.question}], lang
        )
        ids = self.engine.chat_ids(messages)
        text = ""
        async for ev in self.scheduler.stream(ids, GenerationParams(max_new_tokens=64)):
            text += ev.delta
        text = text.strip().splitlines()[0].strip() if text.strip() else ""
        return text or inp.question

    async def stream(self, inp: AskInput) -> AsyncIterator[AnswerEvent]:
        t0 = time.perf_counter()
        lang = language_of(inp.question)
        query = await self._standalone(inp, lang)
        result = await run_in_threadpool(
            self.retriever.search,
            query,
            top_k=inp.top_k,
            collection=inp.collection,
            document_ids=inp.document_ids,
        )
        retrieve_ms = (time.perf_counter() - t0) * 1000
        timings = {"retrieve_ms": round(retrieve_ms, 1)}
        debug = (
            {"retrieved": [passage_dict(i + 1, p) for i, p in enumerate(result.passages)]}
            if inp.debug
            else {}
        )
        if inp.debug:
            debug["max_dense"] = result.max_dense
            debug["query"] = query
        if self.weak_evidence(result, lang):
            async for ev in self._refuse(lang, t0, timings, debug, 0, 0, "weak_evidence"):
                yield ev
            return
        # Passages with neither a shared term nor semantic closeness only distract a small
        # model (and invite wrong citations): they are not given.
        relevant = [
            p
            for p in result.passages
            if (p.lexical_score or 0) > 0 or (p.dense_score or -1) >= self.refusal_threshold
        ] or result.passages[:1]
        budget = min(self.engine.context_length, self.max_context_tokens)
        budget -= inp.params.max_new_tokens + 32
        prompt = build_prompt(
            query, relevant, count_tokens=self.count_tokens, budget_tokens=budget, lang=lang
        )
        ids = self.engine.chat_ids(prompt.messages)
        prefix = self._cache_prefix(ids, prompt.messages[0]["content"], lang)
        if self.answerable_threshold > 0 and lang == "en":
            # English only: the threshold was set on SQuAD 2.0; there is no Chinese data
            # with unanswerable questions to set one on, and on CMRC the model already
            # refuses answerable Chinese questions too often.
            evidence = evidence_sentences(query, prompt.passages)
            check_ids = self.engine.chat_ids(check_messages(query, evidence))
            p_yes = await run_in_threadpool(
                self.scheduler.call,
                lambda: self.engine.choice_probability(
                    check_ids, ["Yes", "yes"], ["No", "no"], cache_prefix_len=self.check_prefix()
                ),
            )
            if inp.debug:
                debug["answerable_p"] = round(p_yes, 4)
                debug["evidence"] = evidence
            if p_yes < self.answerable_threshold:
                async for ev in self._refuse(
                    lang, t0, timings, debug, len(check_ids), 0, "not_answerable"
                ):
                    yield ev
                return
        markers = MarkerFilter(len(prompt.passages))
        held = ""
        released = False
        raw = ""
        sent = ""
        ttft_ms: float | None = None
        final = None
        stream = self.scheduler.stream(ids, inp.params, cache_prefix_len=prefix)
        try:
            async for ev in stream:
                raw += ev.delta
                if ev.done:
                    final = ev
                if not released:
                    held += ev.delta
                    sentence_done = any(ch in held for ch in ".!?。！？\n")
                    if not (ev.done or len(held) >= _HOLD_CHARS or sentence_done):
                        continue
                    if looks_like_refusal(held):
                        break
                    released, out = True, markers.push(held)
                else:
                    out = markers.push(ev.delta)
                if ev.done:
                    out += markers.flush()
                if out:
                    if ttft_ms is None:
                        ttft_ms = (time.perf_counter() - t0) * 1000
                    sent += out
                    yield AnswerEvent("delta", out)
        finally:
            await stream.aclose()
        prompt_tokens = len(ids)
        completion = final.completion_tokens if final else 0
        if not released:  # the model refused (or said nothing)
            async for ev in self._refuse(
                lang, t0, timings, debug, prompt_tokens, completion, "model_refused"
            ):
                yield ev
            return
        text, citations = cite(raw, prompt.passages, query)
        refused = not citations or not text
        reason = "unsupported" if refused else None
        if refused:
            text = REFUSAL[lang]
        if inp.debug:
            debug["raw_answer"] = raw  # the model's own text, before markers were checked
        timings["ttft_ms"] = round(ttft_ms or 0.0, 1)
        yield AnswerEvent(
            "citations",
            data={
                "answer": text,
                "refused": refused,
                "refusal_reason": reason,
                "citations": [] if refused else [citation_dict(c) for c in citations],
                **debug,
            },
        )
        timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        yield AnswerEvent(
            "done",
            data={
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion},
                "timings": timings,
                "finish_reason": final.finish_reason if final else "stop",
            },
        )

    async def _refuse(
        self,
        lang: str,
        t0: float,
        timings: dict[str, float],
        debug: dict[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
        reason: str,
    ) -> AsyncIterator[AnswerEvent]:
        text = REFUSAL[lang]
        timings["ttft_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        yield AnswerEvent("delta", text)
        yield AnswerEvent(
            "citations",
            data={
                "answer": text,
                "refused": True,
                "refusal_reason": reason,
                "citations": [],
                **debug,
            },
        )
        timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        yield AnswerEvent(
            "done",
            data={
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                "timings": timings,
                "finish_reason": "stop",
            },
        )

    async def answer(self, inp: AskInput) -> dict[str, Any]:
        """The whole answer as one object (non-streaming)."""
        out: dict[str, Any] = {}
        async for ev in self.stream(inp):
            if ev.kind in ("citations", "done"):
                out.update(ev.data)
        return out
