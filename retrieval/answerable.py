"""The answerability check: does the evidence state the answer to this exact question?

SQuAD 2.0-style unanswerable questions are written against the very passage that is
retrieved (same names, one fact changed), so retrieval scores cannot tell them apart and
a small model answers them anyway. Asked about all the passages at once, the 1.5B
generator's yes/no judgement carried no signal (README, "Measured results"). Asked about
the two sentences that share most terms with the question, with a few worked examples of
such trick questions, it separates them (AUROC 0.82 on 120 SQuAD 2.0 questions outside
the published 100-question sample). The check is one short prefill; the system turn and
the examples are the same for every question, so the prefix cache serves them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from retrieval.analyze import tokenize
from retrieval.retriever import Passage

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")

SYSTEM = (
    "You check whether a text answers a question. Many questions are written to look "
    "answerable but ask about something the text does not state: a different name, number "
    "or date, the opposite of what it says, or something it says did not happen. Then "
    "reply No."
)

# Made-up texts, one answerable and one trick question each (not from any eval set).
EXAMPLES = [
    (
        "The bridge was opened in 1932 by the mayor, John Ellis, after four years of work.",
        "Who opened the bridge in 1932?",
        "Yes",
    ),
    (
        "The bridge was opened in 1932 by the mayor, John Ellis, after four years of work.",
        "Who closed the bridge in 1932?",
        "No",
    ),
    (
        "Copper is mined mainly in Chile, which produced 5.6 million tonnes in 2019.",
        "How much copper did Peru produce in 2019?",
        "No",
    ),
    (
        "Copper is mined mainly in Chile, which produced 5.6 million tonnes in 2019.",
        "Which country mines the most copper?",
        "Yes",
    ),
    (
        "The treaty was signed in Paris but never ratified by the Senate.",
        "When did the Senate ratify the treaty?",
        "No",
    ),
    (
        "After the fire, the school moved to a larger building on Hill Street.",
        "Where did the school move after the fire?",
        "Yes",
    ),
]


def _ask(text: str, question: str) -> str:
    return (
        f"Text: {text}\n\nQuestion: {question}\n\n"
        "Does the text state the answer to this exact question? Reply Yes or No."
    )


def evidence_sentences(question: str, passages: Sequence[Passage], n: int = 2) -> str:
    """The `n` sentences of `passages` sharing most terms with `question`, in text order.

    Ties go to the higher-ranked passage and the earlier sentence.
    """
    terms = set(tokenize(question))
    sentences: list[str] = []
    for p in passages:
        sentences.extend(s.strip() for s in _SENTENCE_END.split(p.text) if s.strip())
    if not sentences:
        return ""
    overlap = [len(terms & set(tokenize(s))) for s in sentences]
    best = sorted(range(len(sentences)), key=lambda i: (-overlap[i], i))[:n]
    return " ".join(sentences[i] for i in sorted(best))


def check_messages(question: str, evidence: str) -> list[dict[str, str]]:
    """A chat whose reply's first token is the yes/no verdict on `evidence`."""
    messages = [{"role": "system", "content": SYSTEM}]
    for text, q, verdict in EXAMPLES:
        messages.append({"role": "user", "content": _ask(text, q)})
        messages.append({"role": "assistant", "content": verdict})
    messages.append({"role": "user", "content": _ask(evidence, question)})
    return messages
