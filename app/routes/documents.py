"""Document, chunk, job and admin routes: the write side of the API."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from app.deps import AdminDep, ServicesDep, SessionDep
from app.errors import NotFound, PayloadTooLarge, ServiceUnavailable, Unprocessable
from app.errors import UnsupportedMediaType as Unsupported
from app.schemas import (
    ChunkList,
    ChunkPublic,
    DocumentList,
    DocumentPublic,
    JobPublic,
    ReindexRequest,
)
from ingest import detect, queue, repo
from ingest.schema import JobKind

router = APIRouter()
admin_router = APIRouter(prefix="/admin")

_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
STATUSES = ("queued", "processing", "ready", "failed")


def _pipeline(services: ServicesDep) -> Any:
    pipeline = services.extras.get("pipeline")
    if pipeline is None:
        status = services.embedder_status.as_dict()
        raise ServiceUnavailable(f"ingestion is not available: {status['detail'] or 'starting'}")
    return pipeline


def _metadata(raw: object) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise Unprocessable("metadata must be a JSON object in a form field, not a file")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise Unprocessable(f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise Unprocessable(f"metadata must be a JSON object, got {type(value).__name__}")
    return value


@router.post(
    "/documents",
    status_code=202,
    response_model=DocumentPublic,
    responses={200: {"model": DocumentPublic, "description": "Duplicate of an existing one"}},
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "collection": {"type": "string", "default": "default"},
                            "metadata": {"type": "string", "description": "JSON object"},
                        },
                    }
                }
            },
            "required": True,
        }
    },
)
async def upload_document(
    request: Request, services: ServicesDep, session: SessionDep
) -> JSONResponse:
    """Upload one file (multipart field `file`); it is parsed and indexed in the background."""
    _pipeline(services)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Unprocessable("send the document as multipart/form-data with a field named 'file'")
    form = await request.form(max_files=1, max_fields=16)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise Unprocessable("multipart field 'file' is required")
    collection = str(form.get("collection") or "default")
    if not _COLLECTION_RE.match(collection):
        raise Unprocessable(
            f"collection must be 1-128 letters, digits, '_', '.' or '-', got {collection!r}"
        )
    metadata = _metadata(form.get("metadata"))
    limit = services.settings.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
    if not data:
        raise Unprocessable("the uploaded file is empty")
    filename = (upload.filename or "upload").rsplit("/", 1)[-1][:512]
    try:
        kind = detect.detect(data, filename)
    except detect.UnsupportedType as exc:
        raise Unsupported(f"unsupported file type: {exc}") from exc
    store = services.extras["store"]
    sha = await run_in_threadpool(store.put, data)
    doc, job, duplicate = repo.create_document(
        session=session,
        collection=collection,
        filename=filename,
        sha256=sha,
        mime=kind.mime,
        size=len(data),
        metadata=metadata,
    )
    session.commit()
    if duplicate:
        job_id = repo.latest_job_id(session=session, document_id=doc.id)
        body = DocumentPublic.of(doc, job_id=job_id, duplicate=True)
        return JSONResponse(body.model_dump(mode="json"), status_code=200)
    wake = services.extras.get("wake_worker")
    if wake is not None:
        wake()
    body = DocumentPublic.of(doc, job_id=job.id if job else None)
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


@router.get("/documents", response_model=DocumentList)
def list_documents(
    session: SessionDep,
    collection: str | None = None,
    status: Annotated[str | None, Query(pattern="^(queued|processing|ready|failed)$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DocumentList:
    docs, total = repo.list_documents(
        session=session, collection=collection, status=status, limit=limit, offset=offset
    )
    counts = repo.chunk_counts(session=session, document_ids=[d.id for d in docs])
    items = [DocumentPublic.of(d, chunk_count=counts.get(d.id, 0)) for d in docs]
    return DocumentList(items=items, total=total, limit=limit, offset=offset)


def _get_document_or_404(session: Any, document_id: int) -> Any:
    doc = repo.get_document(session=session, document_id=document_id)
    if doc is None:
        raise NotFound(f"document {document_id} not found")
    return doc


@router.get("/documents/{document_id}", response_model=DocumentPublic)
def get_document(document_id: int, session: SessionDep) -> DocumentPublic:
    doc = _get_document_or_404(session, document_id)
    counts = repo.chunk_counts(session=session, document_ids=[doc.id])
    job_id = repo.latest_job_id(session=session, document_id=doc.id)
    return DocumentPublic.of(doc, chunk_count=counts.get(doc.id, 0), job_id=job_id)


@router.get("/documents/{document_id}/chunks", response_model=ChunkList)
def get_document_chunks(
    document_id: int,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ChunkList:
    _get_document_or_404(session, document_id)
    chunks, total = repo.list_chunks(
        session=session, document_id=document_id, limit=limit, offset=offset
    )
    return ChunkList(
        document_id=document_id,
        items=[ChunkPublic.of(c) for c in chunks],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.delete("/documents/{document_id}", status_code=204)
async def delete_document(document_id: int, services: ServicesDep) -> Response:
    pipeline = _pipeline(services)
    removed = await run_in_threadpool(pipeline.delete_document, document_id)
    if not removed:
        raise NotFound(f"document {document_id} not found")
    return Response(status_code=204)


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: int, session: SessionDep) -> JobPublic:
    job = repo.get_job(session=session, job_id=job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return JobPublic.of(job)


@admin_router.post("/reindex", status_code=202, response_model=JobPublic)
def start_reindex(
    _admin: AdminDep,
    services: ServicesDep,
    session: SessionDep,
    body: ReindexRequest | None = None,
) -> JobPublic:
    """Start a job that rebuilds the search index from the database (admin key)."""
    params = {"reparse": bool(body and body.reparse)}
    job = queue.enqueue(session=session, kind=JobKind.REINDEX, params=params)
    session.commit()
    wake = services.extras.get("wake_worker")
    if wake is not None:
        wake()
    return JobPublic.of(job)
