"""The FastAPI application: built from Settings, wired once in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI

from app.deps import require_user
from app.errors import install_handlers
from app.generator import start_generator, stop_generator
from app.routes import ask, documents, health
from app.services import ComponentStatus, Services
from app.settings import Settings
from app.upload_limit import UploadLimit
from app.wiring import build_ingest, build_retriever, build_worker
from ingest.db import make_engine, make_session_factory, migrate

logger = logging.getLogger(__name__)


def build_services(settings: Settings) -> Services:
    """Create the data dir, connect and migrate the database, and set up component slots."""
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    return Services(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        generator_status=ComponentStatus(settings.generator),
        embedder_status=ComponentStatus(settings.embedder),
    )


def start_ingest(services: Services) -> None:
    """Load the embedder and index, and start the in-process worker (unless disabled)."""
    settings = services.settings
    services.embedder_status.set("loading")
    try:
        parts = build_ingest(settings, services.sessions)
    except Exception as exc:  # a missing package or a mismatched index: report, keep serving
        logger.error("ingestion unavailable: %s", exc)
        services.embedder_status.set("error", str(exc))
        return
    services.embedder_status.set("ready", f"{parts.embedder.name} ({parts.embedder.dim}-d)")
    services.extras.update(
        store=parts.store, embedder=parts.embedder, index=parts.index, pipeline=parts.pipeline
    )
    services.extras["retriever"] = build_retriever(settings, services.sessions, parts)
    if settings.worker:
        worker = build_worker(settings, services.sessions, parts.pipeline)
        worker.start()
        services.extras["worker"] = worker
        services.extras["wake_worker"] = worker.wake
    else:
        # No worker here to save deferred index changes when idle: save every change.
        parts.index.save_interval_s = 0.0


def stop_ingest(services: Services) -> None:
    worker = services.extras.get("worker")
    if worker is not None:
        worker.stop()
    index = services.extras.get("index")
    if index is not None:
        index.flush()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        start_ingest(services)
        start_generator(services)
        logger.info(
            "ragqa ready: database=%s data_dir=%s",
            services.engine.dialect.name,
            settings.resolved_data_dir,
        )
        try:
            yield
        finally:
            stop_ingest(services)
            stop_generator(services)
            services.engine.dispose()

    app: FastAPI = FastAPI(
        title="ragqa",
        version="0.1.0",
        description="Question answering over your own documents, with cited answers.",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.include_router(health.router)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_user)])
    v1.include_router(documents.router)
    v1.include_router(documents.admin_router)
    v1.include_router(ask.router)
    app.include_router(v1)
    return app
