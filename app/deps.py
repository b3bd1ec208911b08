"""FastAPI dependency aliases: routes receive components, never build them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import check_admin, check_user
from app.services import Services
from app.settings import Settings


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
