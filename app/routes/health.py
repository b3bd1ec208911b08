"""`GET /healthz`: unauthenticated liveness with the state of database, index and models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServicesDep
from ingest.db import ping

router = APIRouter()


@router.get("/healthz")
def healthz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    ok = True
    try:
        ping(services.engine)
        checks["database"] = {"state": "ready", "dialect": services.engine.dialect.name}
    except Exception as exc:  # any driver error means "down"; report it, don't raise
        ok = False
        checks["database"] = {"state": "error", "detail": str(exc)}
    index = services.extras.get("index")
    if index is None:
        checks["index"] = {"state": "not_loaded"}
    else:
        checks["index"] = {"state": "ready", **index.describe()}
    checks["embedder"] = services.embedder_status.as_dict()
    checks["generator"] = services.generator_status.as_dict()
    status = "ok" if ok else "error"
    return JSONResponse({"status": status, **checks}, status_code=200 if ok else 503)
