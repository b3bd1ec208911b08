"""The service's guarantees on answers: every [n] names a given passage, refusals are clean.

`MarkerFilter` cleans the model's text as it streams: `[n]` markers that name a passage
that was given pass (normalised), all others are removed before anything is sent.
`cite()` maps the markers of the final text to passages; when the model wrote none, each
sentence is attached to the passage that shares most of its terms (`inferred`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from retrieval.analyze import tokenize
from retrieval.retriever import Passage

# [1], [1, 2], [1-3], 【1】, [Passage 1], [资料1]
_MARKER = re.compile(
    r"[\[【]\s*(?:passages?|sources?|资料|来源)?\s*([0-9][0-9,，、\s\-–]*)\s*[\]】]", re.I
)
_OPEN = "[【"
_MAX_MARKER = 24  # longer bracket text is not a marker: let it through

_REFUSAL_PATTERNS = [
    r"(do(es)?|did) not (contain|provide|include|mention|say|specify|state|have)",
    r"(cannot|can't|can not|unable to) (be )?(answer|determine|find|tell)",
    r"no (information|mention|answer)",
    r"not (mentioned|provided|specified|stated|found|available) in",
    r"there is no (information|answer|mention)",
    r"无法回答",
    r"(没有|未)(提到|提及|提供|说明|包含|涉及)",
    r"资料中(没有|并未|未)",
    r"无法(确定|得知|判断)",
]
_REFUSAL_RE = re.compile("|".join(_REFUSAL_PATTERNS), re.I)


def looks_like_refusal(text: str) -> bool:
    return bool(_REFUSAL_RE.search(text))


def _numbers(group: str) -> list[int]:
    out: list[int] = []
    for part in re.split(r"[,，、\s]+", group.strip()):
        if not part:
            continue
        if re.fullmatch(r"\d+\s*[-–]\s*\d+", part):
            a, b = (int(x) for x in re.split(r"[-–]", part))
            if 0 < b - a < 20:
                out.extend(range(a, b + 1))
        elif part.isdigit():
            out.append(int(part))
    return out


def clean_markers(text: str, valid: int) -> str:
    """Rewrite markers as [n][m]; drop numbers outside 1..valid (and empty markers)."""

    def repl(match: re.Match[str]) -> str:
        nums = [n for n in _numbers(match.group(1)) if 1 <= n <= valid]
        return "".join(f"[{n}]" for n in dict.fromkeys(nums))

    return _MARKER.sub(repl, text)


class MarkerFilter:
    """Streaming version of `clean_markers`: holds text back while a marker may be open."""

    def __init__(self, valid: int) -> None:
        self.valid = valid
        self.pending = ""

    def push(self, delta: str) -> str:
        self.pending += delta
        cut = max(self.pending.rfind(ch) for ch in _OPEN)
        tail = self.pending[cut:] if cut != -1 else ""
        if tail and "]" not in tail and "】" not in tail and len(tail) <= _MAX_MARKER:
            ready, self.pending = self.pending[:cut], tail
            return clean_markers(ready, self.valid)
        ready, self.pending = self.pending, ""
        return clean_markers(ready, self.valid)

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return clean_markers(ready, self.valid)


@dataclass
class Citation:
    number: int
    passage: Passage
    inferred: bool = False


_SENTENCE = re.compile(r"[^。！？.!?\n]+[。！？.!?]*")


def cited_numbers(text: str) -> list[int]:
    seen: dict[int, None] = {}
    for match in _MARKER.finditer(text):
        for n in _numbers(match.group(1)):
            seen[n] = None
    return list(seen)


def infer_citations(text: str, passages: list[Passage], min_overlap: float = 0.5) -> list[int]:
    """For each sentence, the passage sharing the largest share of its terms (if enough)."""
    terms = [set(tokenize(p.text)) for p in passages]
    chosen: dict[int, None] = {}
    for sentence in _SENTENCE.findall(text):
        words = set(tokenize(sentence))
        if len(words) < 2:
            continue
        best, best_share = -1, 0.0
        for i, passage_terms in enumerate(terms):
            share = len(words & passage_terms) / len(words)
            if share > best_share:
                best, best_share = i, share
        if best >= 0 and best_share >= min_overlap:
            chosen[best + 1] = None
    return list(chosen)


def verify_markers(text: str, passages: list[Passage]) -> str:
    """Drop markers whose passage shares no term with the sentence that cites it.

    Small models often cite a passage number at random; a sentence and the passage it
    rests on always share some words (names, numbers, terms).
    """
    terms = [set(tokenize(p.text)) for p in passages]
    out: list[str] = []
    for sentence in re.split(r"(?<=[。！？.!?\n])", text):
        words = set(tokenize(_MARKER.sub(" ", sentence)))
        if not words:
            out.append(sentence)
            continue

        def keep(match: re.Match[str], words: set[str] = words) -> str:
            nums = [n for n in _numbers(match.group(1)) if words & terms[n - 1]]
            return "".join(f"[{n}]" for n in nums)

        out.append(_MARKER.sub(keep, sentence))
    return "".join(out)


def cite(text: str, passages: list[Passage]) -> tuple[str, list[Citation]]:
    """Final text (markers cleaned and verified) and its citations, in order of mention."""
    text = clean_markers(text, len(passages)).strip()
    text = verify_markers(text, passages)
    numbers = [n for n in cited_numbers(text) if 1 <= n <= len(passages)]
    if numbers:
        return text, [Citation(n, passages[n - 1]) for n in numbers]
    inferred = infer_citations(text, passages)
    return text, [Citation(n, passages[n - 1], inferred=True) for n in inferred]
