"""The generator runtime: load the model off the request path and expose engine + scheduler."""

from __future__ import annotations

import logging
import threading
import time

from app.answer import warm_prompt_prefixes
from app.services import Services
from app.wiring import answerable_threshold
from generation.engine import Engine, LoadReport
from generation.provision import resolve_generator
from generation.scheduler import Scheduler

logger = logging.getLogger(__name__)


def load_generator(services: Services) -> None:
    """Provision (if needed) and load the generator on its own model thread; wait for it."""
    settings = services.settings
    status = services.generator_status
    status.set("loading", f"loading {settings.generator}")
    reports: list[LoadReport] = []

    def loader() -> Engine:
        path = resolve_generator(
            settings.generator, settings.resolved_model_dir, allow_hub=settings.hub_models
        )
        engine, report = Engine.load(
            path,
            device=settings.device,
            dtype=settings.dtype,
            name=settings.generator,
            quantization=settings.quantization,
            group_size=settings.quant_group_size,
            prefill_weights=settings.prefill_weights,
        )
        engine.prefix_cache.max_entries = settings.prefix_cache
        engine.warm_up()
        if settings.prefix_cache > 0:
            start = time.perf_counter()
            try:
                cached = warm_prompt_prefixes(engine, check=answerable_threshold(settings) > 0)
            except Exception as exc:  # only a head start: questions compute them anyway
                logger.warning("could not cache the prompt prefixes at start-up: %s", exc)
            else:
                logger.info(
                    "prompt prefixes cached in %.1f s: %s tokens",
                    time.perf_counter() - start,
                    cached,
                )
        reports.append(report)
        return engine

    scheduler = Scheduler(max_batch=settings.max_batch)
    scheduler.start(loader)
    scheduler.ready.wait()
    if scheduler.load_error is not None:
        exc = scheduler.load_error
        logger.error("generator %s failed to load: %s", settings.generator, exc)
        status.set("error", str(exc))
        return
    report = reports[0]
    services.extras["engine"] = scheduler.engine
    services.extras["scheduler"] = scheduler
    services.extras["load_report"] = report
    status.set(
        "ready",
        f"{report.model} on {report.device} ({report.dtype}, quantization "
        f"{report.quantization}, prefill from {report.prefill_weights} weights in "
        f"{report.prefill_dtype or report.dtype}), loaded in {report.load_s}s",
    )


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
