"""Hybrid retrieval: dense (FAISS) and lexical (BM25) candidates, fused by RRF, optionally reranked.

Only chunks of documents that are `ready` come back, with their provenance read from the
database. Filters (collection, document ids) are exact: a flat index searches only the
allowed ids; with HNSW/IVF a narrow filter is scanned over the vectors stored in the
database rather than hoping the approximate global top-k reaches it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest.repo import stored_vectors
from ingest.schema import Chunk, Document, DocumentStatus
from retrieval.fuse import rrf
from retrieval.index import VectorIndex
from retrieval.lexical import LexicalIndex
from retrieval.rerank import Reranker

logger = logging.getLogger(__name__)

BRUTE_FORCE_LIMIT = 20_000  # filtered sets up to this size are searched exactly
MODES = ("dense", "lexical", "hybrid")


@dataclass
class Passage:
    chunk_id: int
    document_id: int
    filename: str
    title: str | None
    page: int | None
    heading_path: str | None
    char_start: int
    char_end: int
    text: str
    score: float  # the score that ranked it (fused, or reranked)
    dense_score: float | None = None  # cosine similarity to the query
    lexical_score: float | None = None  # BM25


@dataclass
class RetrievalResult:
    passages: list[Passage]
    max_dense: float  # best cosine among dense candidates (evidence strength)
    timings_ms: dict[str, float] = field(default_factory=dict)


def load_ready_chunks(sessions: sessionmaker[Session]) -> tuple[list[int], list[str]]:
    """All (id, text) of ready documents' chunks; the lexical index is built from these."""
    with sessions() as session:
        rows = session.execute(
            select(Chunk.id, Chunk.text)
            .join(Document)
            .where(Document.status == DocumentStatus.READY)
            .order_by(Chunk.id)
        ).all()
    return [r[0] for r in rows], [r[1] for r in rows]


class Retriever:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        embedder: Any,
        index: VectorIndex,
        lexical: LexicalIndex | None = None,
        reranker: Reranker | None = None,
        rrf_k: int = 60,
    ) -> None:
        self.sessions = sessions
        self.embedder = embedder
        self.index = index
        self.lexical = lexical or LexicalIndex(lambda: load_ready_chunks(sessions))
        self.reranker = reranker
        self.rrf_k = rrf_k

    def _allowed(
        self, collection: str | None, document_ids: Sequence[int] | None
    ) -> list[int] | None:
        if collection is None and not document_ids:
            return None
        query = select(Chunk.id).join(Document).where(Document.status == DocumentStatus.READY)
        if collection is not None:
            query = query.where(Document.collection == collection)
        if document_ids:
            query = query.where(Document.id.in_(list(document_ids)))
        with self.sessions() as session:
            return list(session.execute(query).scalars())

    def _dense(
        self, vector: np.ndarray, k: int, allowed: list[int] | None
    ) -> list[tuple[int, float]]:
        """vector float32 [1, dim] -> [(chunk id, cosine)] best first."""
        if allowed is not None and self.index.exact_within:
            scores, ids = self.index.search(vector, k, within=allowed)
            return [(int(c), float(s)) for s, c in zip(scores[0], ids[0], strict=True) if c >= 0]
        # HNSW/IVF search approximately: a narrow filter is scanned exactly from the
        # vectors stored in the database instead.
        if allowed is not None and len(allowed) <= BRUTE_FORCE_LIMIT:
            ids, matrix = self._stored_vectors(allowed)
            if not ids:
                return []
            sims = matrix @ vector[0]
            top = np.argsort(-sims)[:k]
            return [(ids[i], float(sims[i])) for i in top]
        fetch = k if allowed is None else min(len(self.index), k * 20)
        scores, ids = self.index.search(vector, max(fetch, 1))
        allowed_set = set(allowed) if allowed is not None else None
        out = []
        for score, chunk_id in zip(scores[0], ids[0], strict=True):
            if chunk_id < 0 or (allowed_set is not None and int(chunk_id) not in allowed_set):
                continue
            out.append((int(chunk_id), float(score)))
            if len(out) == k:
                break
        return out

    def _stored_vectors(self, ids: list[int]) -> tuple[list[int], np.ndarray]:
        with self.sessions() as session:
            return stored_vectors(session=session, ids=ids, dim=self.index.dim)

    def search(
        self,
        query: str,
        *,
        top_k: int = 5,
        collection: str | None = None,
        document_ids: Sequence[int] | None = None,
        mode: str = "hybrid",
        candidates: int = 50,
    ) -> RetrievalResult:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        allowed = self._allowed(collection, document_ids)
        if allowed is not None and not allowed:
            return RetrievalResult([], 0.0, {"total_ms": 0.0})
        dense: list[tuple[int, float]] = []
        lexical: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid"):
            t = time.perf_counter()
            vector = self.embedder.embed([query])
            timings["embed_ms"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            dense = self._dense(vector, candidates, allowed)
            timings["dense_ms"] = (time.perf_counter() - t) * 1000
        if mode in ("lexical", "hybrid"):
            t = time.perf_counter()
            self.lexical.ensure(self.index.version)
            lexical = self.lexical.search(query, candidates, allowed)
            timings["lexical_ms"] = (time.perf_counter() - t) * 1000
        dense_scores = dict(dense)
        lexical_scores = dict(lexical)
        if mode == "dense":
            ranked = dense
        elif mode == "lexical":
            ranked = lexical
        else:
            fused = rrf([[c for c, _ in dense], [c for c, _ in lexical]], k=self.rrf_k)
            # Equal fused scores are common (one list's 1st is the other's 2nd): the
            # semantic score breaks the tie.
            ranked = sorted(fused, key=lambda cs: (-round(cs[1], 12), -dense_scores.get(cs[0], -1)))
        pool = ranked[: max(top_k, candidates if self.reranker else top_k) * 2]
        rows = self._rows([c for c, _ in pool])
        passages = []
        for chunk_id, score in pool:
            row = rows.get(chunk_id)
            if row is None:
                continue  # a vector whose chunk was deleted meanwhile
            chunk, doc = row
            passages.append(
                Passage(
                    chunk_id=chunk_id,
                    document_id=doc.id,
                    filename=doc.filename,
                    title=doc.title,
                    page=chunk.page,
                    heading_path=chunk.heading_path,
                    char_start=chunk.char_start,
                    char_end=chunk.char_end,
                    text=chunk.text,
                    score=float(score),
                    dense_score=dense_scores.get(chunk_id),
                    lexical_score=lexical_scores.get(chunk_id),
                )
            )
        if self.reranker is not None and passages:
            t = time.perf_counter()
            scores = self.reranker.score(query, [p.text for p in passages])
            for p, s in zip(passages, scores, strict=True):
                p.score = s
            passages.sort(key=lambda p: -p.score)
            timings["rerank_ms"] = (time.perf_counter() - t) * 1000
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        max_dense = max((s for _, s in dense), default=0.0)
        return RetrievalResult(passages[:top_k], max_dense, timings)

    def _rows(self, ids: list[int]) -> dict[int, tuple[Chunk, Document]]:
        """Chunks by id with their (ready) documents.

        Two primary-key lookups rather than one join: SQLite's planner otherwise starts
        from the documents' status index and scans every ready document per query.
        """
        if not ids:
            return {}
        with self.sessions() as session:
            chunks = list(session.execute(select(Chunk).where(Chunk.id.in_(ids))).scalars())
            doc_ids = {c.document_id for c in chunks}
            docs = {
                d.id: d
                for d in session.execute(
                    select(Document).where(
                        Document.id.in_(doc_ids), Document.status == DocumentStatus.READY
                    )
                ).scalars()
            }
            session.expunge_all()
        return {c.id: (c, docs[c.document_id]) for c in chunks if c.document_id in docs}
