"""Build the ingestion components from Settings: embedder, index, chunker, pipeline, worker.

Shared by the API lifespan and the CLI commands (worker, ingest, reindex) so that every
entry point wires the same way.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.answer import Answerer
from app.settings import Settings
from generation.device import cpu_has_fast_bf16
from generation.engine import Engine
from generation.presets import answerable_threshold_for
from generation.scheduler import Scheduler
from ingest.chunk import Chunker
from ingest.embed import Embedder, load_embedder
from ingest.pipeline import Pipeline
from ingest.store import BlobStore
from ingest.worker import Worker
from retrieval.index import VectorIndex
from retrieval.rerank import CrossEncoderReranker
from retrieval.retriever import Retriever

logger = logging.getLogger(__name__)


@dataclass
class IngestParts:
    store: BlobStore
    embedder: Embedder
    index: VectorIndex
    pipeline: Pipeline


def index_folder(settings: Settings, embedder_name: str) -> Path:
    """One index folder per embedder, so a re-embed builds beside the live index."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder_name).strip("_") or "index"
    return settings.resolved_data_dir / "index" / slug


def build_embedder(settings: Settings, name: str | None = None) -> Embedder:
    import torch

    device = "cuda" if settings.device != "cpu" and torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" or cpu_has_fast_bf16()
    return load_embedder(name or settings.embedder, device=device, bf16=bf16)


def build_ingest(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    embedder: Embedder | None = None,
) -> IngestParts:
    embedder = embedder or build_embedder(settings)
    store = BlobStore(settings.resolved_data_dir)
    index = VectorIndex(
        index_folder(settings, embedder.name),
        embedder=embedder.name,
        dim=embedder.dim,
        index_type=settings.index_type,
        # Saving rewrites the whole index file: a busy worker saves every few seconds
        # (and when idle); the database keeps every vector, so nothing is lost in between.
        save_interval_s=5.0,
    )
    chunker = Chunker(
        embedder.count_tokens,
        target=min(settings.chunk_tokens, embedder.max_tokens),
        overlap=settings.chunk_overlap,
    )
    pipeline = Pipeline(
        sessions=sessions, store=store, embedder=embedder, index=index, chunker=chunker
    )
    return IngestParts(store=store, embedder=embedder, index=index, pipeline=pipeline)


def build_worker(
    settings: Settings, sessions: sessionmaker[Session], pipeline: Pipeline, **kwargs: object
) -> Worker:
    return Worker(
        sessions=sessions,
        pipeline=pipeline,
        lease_s=settings.job_lease_s,
        max_attempts=settings.job_max_attempts,
        **kwargs,  # type: ignore[arg-type]
    )


def answerable_threshold(settings: Settings) -> float:
    """The configured threshold, else the one measured for the generator preset."""
    if settings.answerable_threshold is not None:
        return settings.answerable_threshold
    return answerable_threshold_for(settings.generator)


def build_answerer(
    settings: Settings, *, retriever: Retriever, engine: Engine, scheduler: Scheduler
) -> Answerer:
    return Answerer(
        retriever=retriever,
        engine=engine,
        scheduler=scheduler,
        refusal_threshold=settings.refusal_threshold,
        answerable_threshold=answerable_threshold(settings),
        max_context_tokens=settings.max_context_tokens,
    )


def build_retriever(
    settings: Settings, sessions: sessionmaker[Session], parts: IngestParts
) -> Retriever:
    reranker = CrossEncoderReranker(Path(settings.reranker)) if settings.reranker else None
    return Retriever(
        sessions=sessions,
        embedder=parts.embedder,
        index=parts.index,
        reranker=reranker,
        rrf_k=settings.rrf_k,
    )
