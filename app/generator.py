"""The generator runtime: load the model off the request path and expose engine + scheduler."""

from __future__ import annotations

import logging
import threading

from app.services import Services
from generation.engine import Engine
from generation.provision import resolve_generator
from generation.scheduler import Scheduler

logger = logging.getLogger(__name__)


def load_generator(services: Services) -> None:
    """Provision (if needed) and load the generator, recording progress in its status."""
    settings = services.settings
    status = services.generator_status
    status.set("loading", f"loading {settings.generator}")
    try:
        path = resolve_generator(
            settings.generator, settings.resolved_model_dir, allow_hub=settings.hub_models
        )
        engine, report = Engine.load(
            path, device=settings.device, dtype=settings.dtype, name=settings.generator
        )
        engine.prefix_cache.max_entries = settings.prefix_cache
        scheduler = Scheduler(engine, max_batch=settings.max_batch)
        scheduler.start()
    except Exception as exc:  # missing package, corrupt folder, out of memory: report it
        logger.exception("generator %s failed to load", settings.generator)
        status.set("error", str(exc))
        return
    services.extras["engine"] = engine
    services.extras["scheduler"] = scheduler
    status.set(
        "ready", f"{report.model} on {report.device} ({report.dtype}), loaded in {report.load_s}s"
    )
    on_ready = services.extras.get("on_generator_ready")
    if on_ready is not None:
        on_ready()


def start_generator(services: Services, *, background: bool = True) -> None:
    if not services.settings.load_generator:
        services.generator_status.set("disabled", "RAGQA_LOAD_GENERATOR=0")
        return
    if background:
        threading.Thread(target=load_generator, args=(services,), daemon=True).start()
    else:
        load_generator(services)


def stop_generator(services: Services) -> None:
    scheduler = services.extras.get("scheduler")
    if scheduler is not None:
        scheduler.stop()
