"""The service's guarantees on answers: every [n] names a given passage, refusals are clean.

`MarkerFilter` cleans the model's text as it streams: `[n]` markers that name a passage
that was given pass (normalised), all others are removed before anything is sent.
`cite()` maps the markers of the final text to passages. A marker must name a passage
that holds what its sentence claims (its terms beyond the question's); a wrong one is
pointed at the passage that does, and when the model wrote none, each sentence is
attached to that passage (both `inferred`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from retrieval.analyze import is_chinese, tokenize
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
_EDGE = re.compile(r"^[\s\"'“”‘’「」《》()（）]+|[\s\"'“”‘’「」《》()（）。！？.!?,，;；:：]+$")


def cited_numbers(text: str) -> list[int]:
    seen: dict[int, None] = {}
    for match in _MARKER.finditer(text):
        for n in _numbers(match.group(1)):
            seen[n] = None
    return list(seen)


def _claim(sentence: str, question_terms: set[str]) -> set[str]:
    """The terms a sentence asserts beyond restating the question (all its terms if none)."""
    words = set(tokenize(_MARKER.sub(" ", sentence)))
    return (words - question_terms) or words


def _support(claim: set[str], terms: list[set[str]]) -> list[float]:
    """Share of `claim` found in each passage's terms."""
    return [len(claim & t) / len(claim) for t in terms]


def _quoted_in(sentence: str, passages: list[Passage]) -> int | None:
    """The number of the first passage containing `sentence` word for word (2+ chars)."""
    core = _EDGE.sub("", _MARKER.sub("", sentence))
    if len(core) < 2:
        return None
    # Chinese has no word boundaries; elsewhere "1966" must not match inside "19660".
    found = re.compile(re.escape(core) if is_chinese(core) else rf"(?<!\w){re.escape(core)}(?!\w)")
    return next((i + 1 for i, p in enumerate(passages) if found.search(p.text)), None)


def infer_citations(
    text: str, passages: list[Passage], question: str = "", min_support: float = 0.5
) -> list[int]:
    """For each sentence, the passage holding the largest share of its claim (if enough)."""
    terms = [set(tokenize(p.text)) for p in passages]
    question_terms = set(tokenize(question))
    chosen: dict[int, None] = {}
    for sentence in _SENTENCE.findall(text):
        words = set(tokenize(sentence))
        if not words:
            continue
        if len(words) == 1:
            # A bare answer ("锣鼓点", "1966"): one shared term is too weak a link, so
            # only a passage that holds it verbatim supports it.
            quoted = _quoted_in(sentence, passages)
            if quoted:
                chosen[quoted] = None
            continue
        support = _support(_claim(sentence, question_terms), terms)
        best = max(range(len(support)), key=lambda i: support[i], default=-1)
        if best >= 0 and support[best] >= min_support:
            chosen[best + 1] = None
    return list(chosen)


def verify_markers(text: str, passages: list[Passage], question: str = "") -> tuple[str, set[int]]:
    """Keep the markers whose passage supports what their sentence claims.

    A sentence's claim is its terms minus the question's: an answer restates the question,
    so sharing the question's words says nothing about where the answer came from. A
    marker stays when its passage holds half the claim, or as much of it as any given
    passage does. Small models often cite a number at random: when none of a sentence's
    markers stays and another passage holds half its claim, the first marker is pointed
    there. Returns the text and the numbers only such re-pointing put in it.
    """
    terms = [set(tokenize(p.text)) for p in passages]
    question_terms = set(tokenize(question))
    out: list[str] = []
    kept: set[int] = set()
    moved: set[int] = set()
    for sentence in re.split(r"(?<=[。！？.!?\n])", text):
        claim = _claim(sentence, question_terms)
        if not claim or not _MARKER.search(sentence):
            out.append(sentence)
            continue
        support = _support(claim, terms)
        best = max(support)
        ok = {i + 1 for i, x in enumerate(support) if x > 0 and (x >= 0.5 or x >= best)}

        def keep(match: re.Match[str], ok: set[int] = ok) -> str:
            nums = [n for n in _numbers(match.group(1)) if n in ok]
            kept.update(nums)
            return "".join(f"[{n}]" for n in nums)

        checked = _MARKER.sub(keep, sentence)
        if not _MARKER.search(checked) and best >= 0.5:
            target = support.index(best) + 1
            moved.add(target)
            first = _MARKER.search(sentence)
            assert first is not None
            rest = _MARKER.sub("", sentence[first.end() :])
            checked = f"{sentence[: first.start()]}[{target}]{rest}"
        out.append(checked)
    return "".join(out), moved - kept


def cite(text: str, passages: list[Passage], question: str = "") -> tuple[str, list[Citation]]:
    """Final text (markers cleaned and verified) and its citations, in order of mention."""
    text = clean_markers(text, len(passages)).strip()
    text, moved = verify_markers(text, passages, question)
    numbers = [n for n in cited_numbers(text) if 1 <= n <= len(passages)]
    if numbers:
        # A marker the service pointed elsewhere is its inference, not the model's.
        return text, [Citation(n, passages[n - 1], inferred=n in moved) for n in numbers]
    inferred = infer_citations(text, passages, question)
    return text, [Citation(n, passages[n - 1], inferred=True) for n in inferred]
