"""FastAPI dependency aliases: routes receive components, never build them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.answer import Answerer
from app.auth import check_admin, check_user
from app.errors import ServiceUnavailable
from app.services import Services
from app.settings import Settings
from app.wiring import build_answerer


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_settings(services: Annotated[Services, Depends(get_services)]) -> Settings:
    return services.settings


def get_session(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    session = services.sessions()
    try:
        yield session
    finally:
        session.close()


def require_user(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    check_user(services.settings.keys, request)


def require_admin(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    check_admin(services.settings.keys, request)


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
AdminDep = Annotated[None, Depends(require_admin)]


def get_answerer(services: Annotated[Services, Depends(get_services)]) -> Answerer:
    """The answer pipeline; 503 with the reason while the generator or index is not ready."""
    answerer = services.extras.get("answerer")
    if answerer is not None:
        return answerer
    gen = services.generator_status.as_dict()
    if gen["state"] != "ready":
        reason = gen["detail"] or gen["state"]
        raise ServiceUnavailable(f"generator {gen['name']!r} is not loaded: {reason}")
    emb = services.embedder_status.as_dict()
    if "retriever" not in services.extras:
        raise ServiceUnavailable(f"search is not available: {emb['detail'] or emb['state']}")
    with _answerer_lock:
        if "answerer" not in services.extras:
            services.extras["answerer"] = build_answerer(
                services.settings,
                retriever=services.extras["retriever"],
                engine=services.extras["engine"],
                scheduler=services.extras["scheduler"],
            )
    return services.extras["answerer"]


_answerer_lock = threading.Lock()
AnswererDep = Annotated[Answerer, Depends(get_answerer)]
