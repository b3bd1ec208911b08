"""The FastAPI application: built from Settings, wired once in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI

from app.deps import require_user
from app.errors import install_handlers
from app.routes import health
from app.services import ComponentStatus, Services
from app.settings import Settings
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        logger.info(
            "ragqa ready: database=%s data_dir=%s",
            services.engine.dialect.name,
            settings.resolved_data_dir,
        )
        try:
            yield
        finally:
            services.engine.dispose()

    app = FastAPI(
        title="ragqa",
        version="0.1.0",
        description="Question answering over your own documents, with cited answers.",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.include_router(health.router)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_user)])
    app.include_router(v1)
    return app
