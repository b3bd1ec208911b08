"""One document from stored bytes to searchable chunks, and keeping the index equal to the database.

Order of writes, so that a crash anywhere leaves the old state or the new one: parse,
chunk and embed outside any transaction; then one transaction replaces the document's
chunks (with their vectors) and marks it ready; then the FAISS index is updated and saved
atomically. A crash between the commit and the index save is repaired by `reconcile`,
which the worker runs at start: the database holds every vector, so nothing is re-embedded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from ingest import detect, repo
from ingest.chunk import Chunker
from ingest.embed import Embedder
from ingest.parse import DocInfo, ParseError, parse
from ingest.schema import Chunk, Document, DocumentStatus, IndexState
from ingest.store import BlobStore
from retrieval.index import VectorIndex

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class VerifyReport:
    chunks_in_db: int = 0
    vectors_in_index: int = 0
    missing_from_index: list[int] = field(default_factory=list)
    orphans_in_index: list[int] = field(default_factory=list)
    chunks_without_vector: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_from_index or self.orphans_in_index or self.chunks_without_vector)


def record_index_state(*, sessions: sessionmaker[Session], index: VectorIndex) -> None:
    """Mirror the live index's embedder, dimension, version and size into the database."""
    with sessions() as session, session.begin():
        state = session.execute(
            select(IndexState).where(IndexState.name == "main")
        ).scalar_one_or_none()
        if state is None:
            state = IndexState(name="main", embedder=index.embedder, dimension=index.dim)
            session.add(state)
        state.embedder = index.embedder
        state.dimension = index.dim
        state.version = index.version
        state.vector_count = len(index)


class Pipeline:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        store: BlobStore,
        embedder: Embedder,
        index: VectorIndex,
        chunker: Chunker,
        embed_batch: int = 64,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.embedder = embedder
        self.index = index
        self.chunker = chunker
        self.embed_batch = embed_batch

    def embed(self, texts: list[str], progress: Progress | None = None) -> np.ndarray:
        """float32 [n, dim], in batches so that progress can be reported."""
        out = []
        for i in range(0, len(texts), self.embed_batch):
            batch = texts[i : i + self.embed_batch]
            out.append(self.embedder.embed(batch))
            if progress:
                progress(len(batch))
        if not out:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate(out, axis=0)

    def process_document(self, document_id: int, progress: Progress | None = None) -> int:
        """Parse, chunk, embed and store one document; returns its chunk count.

        Raises ParseError for documents that cannot be read (the caller records it).
        """
        with self.sessions() as session:
            doc = session.get(Document, document_id)
            if doc is None:
                raise ParseError(f"document {document_id} no longer exists")
            sha, mime = doc.sha256, doc.mime
            doc.status = DocumentStatus.PROCESSING
            given_title = (doc.meta or {}).get("title")
            session.commit()
        kind = detect.BY_MIME.get(mime)
        if kind is None:
            raise ParseError(f"unsupported type {mime}; supported: {detect.supported_list()}")
        try:
            data = self.store.get(sha)
        except FileNotFoundError as exc:
            raise ParseError("the stored original is missing: upload the file again") from exc
        timings: dict[str, float] = {}
        start = time.perf_counter()
        info = DocInfo()
        try:
            blocks = list(parse(data, kind, info))
        except ParseError:
            raise
        except Exception as exc:
            # A parser library failing on this file fails the same way on a retry.
            logger.warning("parser error on document %s", document_id, exc_info=True)
            raise ParseError(f"could not read this {kind.name.upper()} file: {exc}") from exc
        del data
        timings["parse_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        text, drafts = self.chunker.chunk(blocks)
        del blocks
        timings["chunk_s"] = round(time.perf_counter() - start, 3)
        if not drafts:
            raise ParseError("no text found in the document")
        start = time.perf_counter()
        vectors = self.embed([d.text for d in drafts], progress)
        timings["embed_s"] = round(time.perf_counter() - start, 3)
        self.store.put_text(document_id, text)

        with self.sessions() as session, session.begin():
            old_ids = list(
                session.execute(select(Chunk.id).where(Chunk.document_id == document_id)).scalars()
            )
            session.execute(delete(Chunk).where(Chunk.document_id == document_id))
            rows = [
                Chunk(
                    document_id=document_id,
                    ordinal=i,
                    text=d.text,
                    page=d.page,
                    heading_path=d.heading_path,
                    char_start=d.char_start,
                    char_end=d.char_end,
                    token_count=d.token_count,
                    embedding=vectors[i].astype(np.float32).tobytes(),
                )
                for i, d in enumerate(drafts)
            ]
            session.add_all(rows)
            session.flush()
            new_ids = [r.id for r in rows]
            session.execute(
                update(Document)
                .where(Document.id == document_id)
                .values(
                    status=DocumentStatus.READY,
                    error=None,
                    title=info.title or (str(given_title) if given_title else None),
                    page_count=info.page_count,
                    timings=timings,
                )
            )
        with self.index.writing() as index:
            index.remove(old_ids)
            index.add(new_ids, vectors)
        self._record_index_state()
        return len(new_ids)

    def delete_document(self, document_id: int) -> bool:
        """Remove a document, its chunks, vectors, text and (if unshared) its original."""
        with self.sessions() as session, session.begin():
            doc = session.get(Document, document_id)
            if doc is None:
                return False
            sha = doc.sha256
            ids = list(
                session.execute(select(Chunk.id).where(Chunk.document_id == document_id)).scalars()
            )
            session.delete(doc)
            session.flush()
            shared = session.execute(
                select(Document.id).where(Document.sha256 == sha).limit(1)
            ).first()
        with self.index.writing() as index:
            index.remove(ids)
        self._record_index_state()
        self.store.delete_text(document_id)
        if shared is None:
            self.store.delete(sha)
        return True

    def _record_index_state(self) -> None:
        record_index_state(sessions=self.sessions, index=self.index)

    # -- consistency -----------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Compare the chunks of ready documents with the vectors in the index."""
        self.index.refresh()
        report = VerifyReport()
        with self.sessions() as session:
            rows = session.execute(
                select(Chunk.id, Chunk.embedding.is_(None))
                .join(Document)
                .where(Document.status == DocumentStatus.READY)
            ).all()
        db_ids = {r[0] for r in rows}
        report.chunks_without_vector = sorted(r[0] for r in rows if r[1])
        index_ids = set(self.index.ids().tolist())
        report.chunks_in_db = len(db_ids)
        report.vectors_in_index = len(index_ids)
        report.missing_from_index = sorted(db_ids - index_ids)
        report.orphans_in_index = sorted(index_ids - db_ids)
        return report

    def reconcile(self) -> VerifyReport:
        """Make the index equal the database, from stored vectors; returns what was wrong."""
        report = self.verify()
        if report.missing_from_index or report.orphans_in_index:
            vectors, ids = self._stored_vectors(report.missing_from_index)
            with self.index.writing(force_save=True) as index:
                index.remove(report.orphans_in_index)
                index.add(ids, vectors)
            self._record_index_state()
            logger.warning(
                "index repaired: %d vectors added, %d orphans removed",
                len(ids),
                len(report.orphans_in_index),
            )
        return report

    def _stored_vectors(self, ids: list[int]) -> tuple[np.ndarray, list[int]]:
        with self.sessions() as session:
            found, matrix = repo.stored_vectors(session=session, ids=ids, dim=self.index.dim)
        return matrix, found

    def reparse_all(self) -> int:
        """Re-parse every stored original with the current parser and chunker.

        A document that cannot be read any more is marked failed with the reason and the
        rest go on; other errors (database, disk) stop the run. Returns the failures.
        """
        with self.sessions() as session:
            ids = list(session.execute(select(Document.id)).scalars())
        failures = 0
        for doc_id in ids:
            try:
                self.process_document(doc_id)
            except ParseError as exc:
                failures += 1
                with self.sessions() as session, session.begin():
                    session.execute(
                        update(Document)
                        .where(Document.id == doc_id)
                        .values(status=DocumentStatus.FAILED, error=str(exc))
                    )
        return failures

    def rebuild_index(self, progress: Progress | None = None) -> int:
        """Rebuild the whole index from the vectors stored in the database."""
        with self.sessions() as session:
            ids = list(
                session.execute(
                    select(Chunk.id)
                    .join(Document)
                    .where(Document.status == DocumentStatus.READY)
                    .order_by(Chunk.id)
                ).scalars()
            )
        vectors, found = self._stored_vectors(ids)
        if progress:
            progress(len(found))
        with self.index.writing(force_save=True) as index:
            index.reset(n_hint=len(found))
            index.add(found, vectors)
        self._record_index_state()
        return len(found)
