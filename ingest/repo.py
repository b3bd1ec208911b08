"""Data access for documents, chunks and jobs: keyword-only arguments, no web types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ingest import queue
from ingest.schema import Chunk, Document, DocumentStatus, IngestJob, JobKind


def get_document(*, session: Session, document_id: int) -> Document | None:
    return session.get(Document, document_id)


def find_by_hash(*, session: Session, collection: str, sha256: str) -> Document | None:
    return session.execute(
        select(Document).where(Document.collection == collection, Document.sha256 == sha256)
    ).scalar_one_or_none()


def latest_job_id(*, session: Session, document_id: int) -> int | None:
    return session.execute(
        select(IngestJob.id)
        .where(IngestJob.document_id == document_id)
        .order_by(IngestJob.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def create_document(
    *,
    session: Session,
    collection: str,
    filename: str,
    sha256: str,
    mime: str,
    size: int,
    metadata: dict[str, Any],
) -> tuple[Document, IngestJob | None, bool]:
    """Insert a document and its ingest job in one transaction.

    Returns (document, job, duplicate): when the same bytes are already in the
    collection (also when another request won the race) the existing document comes back.
    """
    existing = find_by_hash(session=session, collection=collection, sha256=sha256)
    if existing is not None:
        return existing, None, True
    try:
        with session.begin_nested():
            doc = Document(
                collection=collection,
                filename=filename,
                sha256=sha256,
                mime=mime,
                size=size,
                status=DocumentStatus.QUEUED,
                meta=metadata,
                timings={},
            )
            session.add(doc)
            session.flush()
            job = queue.enqueue(session=session, kind=JobKind.INGEST, document_id=doc.id)
    except IntegrityError:
        existing = find_by_hash(session=session, collection=collection, sha256=sha256)
        if existing is None:
            raise
        return existing, None, True
    return doc, job, False


def list_documents(
    *,
    session: Session,
    collection: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Document], int]:
    query = select(Document)
    if collection is not None:
        query = query.where(Document.collection == collection)
    if status is not None:
        query = query.where(Document.status == status)
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = session.execute(query.order_by(Document.id).limit(limit).offset(offset)).scalars()
    return list(rows), int(total)


def chunk_counts(*, session: Session, document_ids: Sequence[int]) -> dict[int, int]:
    if not document_ids:
        return {}
    rows = session.execute(
        select(Chunk.document_id, func.count())
        .where(Chunk.document_id.in_(document_ids))
        .group_by(Chunk.document_id)
    ).all()
    return {doc_id: int(n) for doc_id, n in rows}


def list_chunks(
    *, session: Session, document_id: int, limit: int = 100, offset: int = 0
) -> tuple[list[Chunk], int]:
    total = session.execute(
        select(func.count()).where(Chunk.document_id == document_id)
    ).scalar_one()
    rows = session.execute(
        select(Chunk)
        .where(Chunk.document_id == document_id)
        .order_by(Chunk.ordinal)
        .limit(limit)
        .offset(offset)
    ).scalars()
    return list(rows), int(total)


def get_job(*, session: Session, job_id: int) -> IngestJob | None:
    return session.get(IngestJob, job_id)


def collection_exists(*, session: Session, collection: str) -> bool:
    return (
        session.execute(
            select(Document.id).where(Document.collection == collection).limit(1)
        ).first()
        is not None
    )


def stored_vectors(
    *, session: Session, ids: Sequence[int], dim: int
) -> tuple[list[int], np.ndarray]:
    """The vectors stored with these chunks: (ids found, float32 [n, dim]).

    Chunks without a vector of this dimension (another embedder's) are skipped.
    """
    found: list[int] = []
    vecs: list[np.ndarray] = []
    ids = list(ids)
    for start in range(0, len(ids), 1000):
        rows = session.execute(
            select(Chunk.id, Chunk.embedding).where(Chunk.id.in_(ids[start : start + 1000]))
        ).all()
        for chunk_id, blob in rows:
            if blob is not None and len(blob) == 4 * dim:
                found.append(chunk_id)
                vecs.append(np.frombuffer(blob, dtype=np.float32))
    matrix = np.stack(vecs) if vecs else np.zeros((0, dim), np.float32)
    return found, matrix
