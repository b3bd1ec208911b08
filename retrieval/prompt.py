"""The augmented prompt: instructions in the question's language and numbered passages.

Passages are numbered [1]..[k] in rank order with their title and page, and added while
they fit the token budget (lowest-ranked dropped first; a passage that does not fit
whole is cut at a sentence end when that keeps enough of it). The system message is the
same for every question in a language, so its KV state is reused across requests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from retrieval.analyze import is_chinese
from retrieval.retriever import Passage

REFUSAL = {
    "en": "The documents do not contain an answer to this question.",
    "zh": "根据现有资料无法回答该问题。",
}

SYSTEM = {
    "en": (
        "You answer questions using only the numbered passages the user provides. "
        "Answer briefly and directly, quoting the exact words from the passages where possible. "
        "After each sentence, cite the passages it relies on with their numbers in square "
        "brackets, like [1] or [2][3]. Do not use outside knowledge. If the passages do not "
        "contain the answer, reply exactly: " + REFUSAL["en"]
    ),
    "zh": (
        "你只能根据用户提供的编号资料回答问题。回答要简洁直接，尽量引用资料中的原文。"
        "每句话后用方括号标注所依据资料的编号，例如 [1] 或 [2][3]。不要使用资料以外的知识。"
        "如果资料中没有答案，请只回答：" + REFUSAL["zh"]
    ),
}

_SENTENCE_END = re.compile(r"(?<=[。！？；.!?])\s*")


def language_of(text: str) -> str:
    return "zh" if is_chinese(text) else "en"


@dataclass
class BuiltPrompt:
    messages: list[dict[str, str]]
    passages: list[Passage]  # the passages given, in the order of their numbers
    lang: str


def _label(n: int, p: Passage, lang: str) -> str:
    title = p.title or p.filename
    if p.page is not None:
        page = f"第{p.page}页" if lang == "zh" else f"page {p.page}"
        return f"[{n}] {title} ({page})"
    return f"[{n}] {title}"


def _cut_to_sentences(text: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest run of whole sentences from the start that fits `budget` tokens."""
    pieces = [s for s in _SENTENCE_END.split(text) if s]
    out = ""
    for piece in pieces:
        candidate = (out + " " + piece).strip() if out and not is_chinese(piece) else out + piece
        if count(candidate) > budget:
            break
        out = candidate
    return out


def build_prompt(
    question: str,
    passages: Sequence[Passage],
    *,
    count_tokens: Callable[[str], int],
    budget_tokens: int,
    lang: str | None = None,
) -> BuiltPrompt:
    """Messages for the chat template; `budget_tokens` bounds system + passages + question."""
    lang = lang or language_of(question)
    system = SYSTEM[lang]
    q_label = "问题" if lang == "zh" else "Question"
    p_label = "资料" if lang == "zh" else "Passages"
    fixed = count_tokens(system) + count_tokens(f"{p_label}:\n\n{q_label}: {question}") + 16
    remaining = budget_tokens - fixed
    blocks: list[str] = []
    given: list[Passage] = []
    for p in passages:
        label = _label(len(given) + 1, p, lang)
        block = f"{label}\n{p.text}"
        cost = count_tokens(block) + 2
        if cost > remaining:
            # Only the best passage is worth cutting; lower ones are dropped whole.
            if given:
                break
            text = _cut_to_sentences(p.text, remaining - count_tokens(label) - 4, count_tokens)
            if not text:
                break
            block, cost = f"{label}\n{text}", count_tokens(f"{label}\n{text}") + 2
        blocks.append(block)
        given.append(p)
        remaining -= cost
    body = "\n\n".join(blocks)
    user = f"{p_label}:\n{body}\n\n{q_label}: {question}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return BuiltPrompt(messages=messages, passages=given, lang=lang)


CONDENSE = {
    "en": (
        "Rewrite the user's last question as one standalone question that can be understood "
        "without the conversation. Reply with the question only."
    ),
    "zh": "把用户的最后一个问题改写成一个不依赖上下文、可以单独理解的问题。只回复改写后的问题。",
}


def condense_messages(history: Sequence[dict[str, str]], lang: str) -> list[dict[str, str]]:
    """A chat asking the generator to turn a follow-up into a standalone question."""
    lines = []
    for m in history[-8:]:
        who = "User" if m["role"] == "user" else "Assistant"
        lines.append(f"{who}: {m['content'][:1000]}")
    return [
        {"role": "system", "content": CONDENSE[lang]},
        {"role": "user", "content": "\n".join(lines)},
    ]
