"""Text analysis for lexical search and language detection: Chinese via jieba, English stemmed."""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CJK_CHAR = re.compile(f"[{_CJK}]")

_EN_STOP_TEXT = """a an and are as at be but by for from has have he her his i if in into is it
its of on or she so such that the their them then there these they this to was we were what
when where which who whom why will with you your does did do how than"""
_ZH_STOP_TEXT = "的 了 是 在 和 与 及 或 也 就 都 而 之 其 这 那 有 个 为 对 把 被 吗 呢 吧 啊"
STOPWORDS = frozenset(_EN_STOP_TEXT.split())
_ZH_STOP = frozenset(_ZH_STOP_TEXT.split())
_jieba_lock = threading.Lock()


@lru_cache(maxsize=1)
def _stemmer():  # type: ignore[no-untyped-def]
    import Stemmer

    return Stemmer.Stemmer("english")


@lru_cache(maxsize=1)
def _jieba():  # type: ignore[no-untyped-def]
    import jieba

    jieba.setLogLevel(logging.WARNING)
    with _jieba_lock:
        jieba.initialize()
    return jieba


def is_chinese(text: str) -> bool:
    """True when CJK characters make up a good part of the letters of `text`."""
    cjk = len(_CJK_CHAR.findall(text))
    letters = sum(1 for ch in text if ch.isalpha())
    return cjk > 0 and cjk >= 0.3 * max(letters, 1)


def tokenize(text: str) -> list[str]:
    """Index/query terms: jieba words for Chinese runs, stemmed lower-case words otherwise."""
    terms: list[str] = []
    pos = 0
    stem = _stemmer().stemWord
    for match in _CJK_RUN.finditer(text):
        terms.extend(_latin_terms(text[pos : match.start()], stem))
        for word in _jieba().lcut(match.group(0)):
            if word not in _ZH_STOP:
                terms.append(word)
        pos = match.end()
    terms.extend(_latin_terms(text[pos:], stem))
    return terms


def _latin_terms(text: str, stem) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        out.append(stem(word))
    return out
