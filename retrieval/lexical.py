"""BM25 over chunk texts (bm25s), derived from the database and rebuilt when it changes.

The index is rebuilt from the chunks of ready documents whenever the dense index's
version moves on (both follow the same writes). Rebuilds happen in the background while
the previous index keeps answering; the first build is synchronous.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import bm25s
import numpy as np

from retrieval.analyze import tokenize

logger = logging.getLogger(__name__)

ChunkSource = Callable[[], tuple[list[int], list[str]]]  # -> (chunk ids, texts)


class _Built:
    def __init__(self, ids: list[int], texts: list[str], version: int) -> None:
        self.version = version
        self.ids = np.asarray(ids, dtype=np.int64)
        self.position = {cid: i for i, cid in enumerate(ids)}
        self.bm25: bm25s.BM25 | None = None
        if ids:
            self.bm25 = bm25s.BM25()
            self.bm25.index([tokenize(t) or ["\x00"] for t in texts], show_progress=False)


class LexicalIndex:
    def __init__(self, source: ChunkSource) -> None:
        self.source = source
        self._built: _Built | None = None
        self._lock = threading.Lock()
        self._building = False
        self.build_seconds = 0.0

    def _build(self, version: int) -> None:
        start = time.perf_counter()
        ids, texts = self.source()
        built = _Built(ids, texts, version)
        self.build_seconds = time.perf_counter() - start
        with self._lock:
            if self._built is None or self._built.version <= version:
                self._built = built
            self._building = False
        logger.info("lexical index v%d: %d chunks in %.1f s", version, len(ids), self.build_seconds)

    def ensure(self, version: int, *, wait: bool = False) -> None:
        """Make sure an index of `version` exists or is being built."""
        with self._lock:
            current = self._built
            if current is not None and current.version == version:
                return
            if self._building and current is not None and not wait:
                return
            first = current is None
            self._building = True
        if first or wait:
            self._build(version)
        else:
            threading.Thread(target=self._build, args=(version,), daemon=True).start()

    def search(
        self, query: str, k: int, allowed: Sequence[int] | None = None
    ) -> list[tuple[int, float]]:
        """Top-k (chunk id, BM25 score); `allowed` restricts to those chunk ids."""
        built = self._built
        if built is None or built.bm25 is None:
            return []
        terms = tokenize(query)
        if not terms:
            return []
        scores = built.bm25.get_scores(terms)
        if allowed is not None:
            mask = np.zeros(len(built.ids), dtype=bool)
            rows = [built.position[c] for c in allowed if c in built.position]
            mask[rows] = True
            scores = np.where(mask, scores, 0.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top])]
        return [(int(built.ids[i]), float(scores[i])) for i in top if scores[i] > 0]
