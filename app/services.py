"""The components the API needs, built once at start-up from Settings (the wiring)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class ComponentStatus:
    """Load state of a component that may come up after the server starts (models)."""

    name: str
    state: str = "not_loaded"  # not_loaded | loading | ready | error | disabled
    detail: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, state: str, detail: str = "") -> None:
        with self.lock:
            self.state, self.detail = state, detail

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"name": self.name, "state": self.state, "detail": self.detail}


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    generator_status: ComponentStatus
    embedder_status: ComponentStatus
    extras: dict[str, Any] = field(default_factory=dict)
