"""What the `worker`, `ingest` and `reindex` commands do, apart from printing (see cli.py)."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select, update

from app.main import build_services
from app.services import Services
from app.settings import Settings
from app.wiring import IngestParts, build_embedder, build_ingest, build_worker, index_folder
from ingest import detect, repo
from ingest.pipeline import VerifyReport, record_index_state
from ingest.schema import Chunk, Document, IngestJob, JobStatus
from retrieval.index import VectorIndex

logger = logging.getLogger(__name__)


@dataclass
class FileOutcome:
    path: Path
    status: str  # ready | failed | duplicate
    document_id: int | None = None
    chunks: int = 0
    error: str | None = None


def run_worker(settings: Settings) -> None:
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    worker = build_worker(settings, services.sessions, parts.pipeline)

    def _stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: finishing the current job, then stopping", signum)
        worker.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker.run()


def iter_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def ingest_files(
    settings: Settings,
    paths: Iterable[Path],
    *,
    collection: str = "default",
    on_file: Callable[[FileOutcome], None] | None = None,
    services: Services | None = None,
    parts: IngestParts | None = None,
) -> list[FileOutcome]:
    """Queue every file, then work the queue in this process until all of them are done."""
    items = (
        (path, path.name, path.read_bytes(), {"source_path": str(path)})
        for path in iter_files(paths)
    )
    return ingest_items(
        settings, items, collection=collection, on_file=on_file, services=services, parts=parts
    )


def ingest_items(
    settings: Settings,
    items: Iterable[tuple[Path, str, bytes, dict]],
    *,
    collection: str = "default",
    on_file: Callable[[FileOutcome], None] | None = None,
    services: Services | None = None,
    parts: IngestParts | None = None,
) -> list[FileOutcome]:
    """Queue (path, filename, bytes, metadata) items and process them in this process."""
    services = services or build_services(settings)
    parts = parts or build_ingest(settings, services.sessions)
    outcomes: dict[int, FileOutcome] = {}
    results: list[FileOutcome] = []
    for path, filename, data, metadata in items:
        outcome = FileOutcome(path=path, status="failed")
        try:
            if not data:
                raise ValueError("empty file")
            if len(data) > settings.max_upload_bytes:
                raise ValueError(f"larger than the limit of {settings.max_upload_bytes} bytes")
            kind = detect.detect(data, filename)
        except (ValueError, detect.UnsupportedType) as exc:
            outcome.error = str(exc)
            results.append(outcome)
            if on_file:
                on_file(outcome)
            continue
        sha = parts.store.put(data)
        with services.sessions() as session:
            doc, _job, duplicate = repo.create_document(
                session=session,
                collection=collection,
                filename=filename,
                sha256=sha,
                mime=kind.mime,
                size=len(data),
                metadata=metadata,
            )
            session.commit()
        outcome.document_id = doc.id
        results.append(outcome)
        if duplicate:
            outcome.status = "duplicate"
            if on_file:
                on_file(outcome)
        else:
            outcomes[doc.id] = outcome

    def done(job: IngestJob, status: str) -> None:
        outcome = outcomes.get(job.document_id or -1)
        if outcome is None or status == JobStatus.QUEUED:
            return  # a retry is pending; the final status comes later
        with services.sessions() as session:
            doc = session.get(Document, outcome.document_id)
            outcome.status = doc.status if doc else "failed"
            outcome.error = doc.error if doc else "document vanished"
            counts = repo.chunk_counts(session=session, document_ids=[outcome.document_id or 0])
            outcome.chunks = counts.get(outcome.document_id or 0, 0)
        if on_file:
            on_file(outcome)

    worker = build_worker(settings, services.sessions, parts.pipeline, on_job_done=done)
    pending = set(outcomes)
    while pending:
        if not worker.run_once():
            time.sleep(0.2)  # a retry is waiting for its backoff
        with services.sessions() as session:
            rows = session.execute(
                select(Document.id, Document.status).where(Document.id.in_(pending))
            ).all()
        pending = {doc_id for doc_id, status in rows if status not in ("ready", "failed")}
    parts.index.flush()
    return results


def verify(settings: Settings) -> VerifyReport:
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    return parts.pipeline.verify()


def rebuild(
    settings: Settings, *, reparse: bool, progress: Callable[[int], None] | None = None
) -> int:
    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    if reparse:
        parts.pipeline.reparse_all()
    return parts.pipeline.rebuild_index(progress)


def reembed(
    settings: Settings, embedder_name: str, progress: Callable[[int], None] | None = None
) -> tuple[int, Path]:
    """Embed every chunk with another embedder into a new index built beside the live one.

    The live index (folder of the old embedder) keeps serving until the service is
    restarted with RAGQA_EMBEDDER set to the new name; vectors in the database are
    switched in one transaction at the end.
    """
    services = build_services(settings)
    embedder = build_embedder(settings, embedder_name)
    folder = index_folder(settings, embedder.name)
    staging = folder.with_name(folder.name + ".building")
    index = VectorIndex(staging, embedder=embedder.name, dim=embedder.dim, index_type="flat")
    index.reset()
    with services.sessions() as session:
        rows = session.execute(
            select(Chunk.id, Chunk.text).join(Document).where(Document.status == "ready")
        ).all()
    ids = [r[0] for r in rows]
    vectors = np.zeros((len(rows), embedder.dim), dtype=np.float32)
    for start in range(0, len(rows), 64):
        batch = [r[1] for r in rows[start : start + 64]]
        vectors[start : start + len(batch)] = embedder.embed(batch)
        if progress:
            progress(len(batch))
    index.index_type = settings.index_type
    index.reset(n_hint=len(ids))
    index.add(ids, vectors)
    index.save()
    with services.sessions() as session, session.begin():
        for chunk_id, vec in zip(ids, vectors, strict=True):
            session.execute(
                update(Chunk).where(Chunk.id == chunk_id).values(embedding=vec.tobytes())
            )
    if folder.exists():
        old = folder.with_name(folder.name + f".old-{int(time.time())}")
        folder.rename(old)
    staging.rename(folder)
    record_index_state(
        sessions=services.sessions,
        index=VectorIndex(folder, embedder=embedder.name, dim=embedder.dim),
    )
    return len(ids), folder


def load_answerer(settings: Settings):  # type: ignore[no-untyped-def]
    """Everything `ragqa ask` needs, loaded in this process (generator included)."""
    from app.generator import load_generator
    from app.wiring import build_answerer, build_retriever

    services = build_services(settings)
    parts = build_ingest(settings, services.sessions)
    load_generator(services)
    if services.generator_status.state != "ready":
        raise RuntimeError(f"generator not loaded: {services.generator_status.detail}")
    return build_answerer(
        settings,
        retriever=build_retriever(settings, services.sessions, parts),
        engine=services.extras["engine"],
        scheduler=services.extras["scheduler"],
    )
