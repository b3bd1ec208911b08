"""Request and response shapes of the API; ORM rows never leave `app/` unconverted."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from ingest.schema import Chunk, Document, IngestJob


class DocumentPublic(BaseModel):
    id: int
    collection: str
    filename: str
    sha256: str
    size: int
    mime: str
    title: str | None
    status: str
    error: str | None
    page_count: int | None
    chunk_count: int | None = None
    metadata: dict[str, Any]
    timings: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    job_id: int | None = None
    duplicate: bool = False

    @classmethod
    def of(
        cls,
        doc: Document,
        *,
        chunk_count: int | None = None,
        job_id: int | None = None,
        duplicate: bool = False,
    ) -> DocumentPublic:
        return cls(
            id=doc.id,
            collection=doc.collection,
            filename=doc.filename,
            sha256=doc.sha256,
            size=doc.size,
            mime=doc.mime,
            title=doc.title,
            status=doc.status,
            error=doc.error,
            page_count=doc.page_count,
            chunk_count=chunk_count,
            metadata=doc.meta or {},
            timings=doc.timings or {},
            created_at=doc.created_at,
            updated_at=doc.updated_at,
            job_id=job_id,
            duplicate=duplicate,
        )


class DocumentList(BaseModel):
    items: list[DocumentPublic]
    total: int
    limit: int
    offset: int


class ChunkPublic(BaseModel):
    id: int
    ordinal: int
    text: str
    page: int | None
    heading_path: str | None
    char_start: int
    char_end: int
    token_count: int

    @classmethod
    def of(cls, chunk: Chunk) -> ChunkPublic:
        return cls(
            id=chunk.id,
            ordinal=chunk.ordinal,
            text=chunk.text,
            page=chunk.page,
            heading_path=chunk.heading_path,
            char_start=chunk.char_start,
            char_end=chunk.char_end,
            token_count=chunk.token_count,
        )


class ChunkList(BaseModel):
    document_id: int
    items: list[ChunkPublic]
    total: int
    limit: int
    offset: int


class JobPublic(BaseModel):
    id: int
    kind: str
    status: str
    document_id: int | None
    attempts: int
    error: str | None
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, job: IngestJob) -> JobPublic:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            document_id=job.document_id,
            attempts=job.attempts,
            error=job.error,
            params=job.params or {},
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class ReindexRequest(BaseModel):
    reparse: bool = Field(False, description="Re-parse stored originals with the current parser.")


class AskRequest(BaseModel):
    question: str = Field(..., description="The question, in English or Chinese.")
    collection: str | None = None
    document_ids: list[int] | None = None
    top_k: int | None = Field(None, ge=1, le=50)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    debug: bool = False


class CitationPublic(BaseModel):
    number: int
    document_id: int
    filename: str
    title: str | None
    page: int | None
    heading_path: str | None
    char_start: int
    char_end: int
    chunk_id: int
    text: str
    score: float
    dense_score: float | None
    inferred: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AskResponse(BaseModel):
    answer: str
    refused: bool
    refusal_reason: str | None = None
    citations: list[CitationPublic]
    usage: Usage
    timings: dict[str, float]
    # Only with "debug": true.
    retrieved: list[dict[str, Any]] | None = None
    query: str | None = Field(None, description="The question as searched (after condensing).")
    max_dense: float | None = Field(None, description="Best cosine among dense candidates.")
    answerable_p: float | None = Field(None, description="The answerability check's P(yes).")
    evidence: str | None = Field(None, description="The sentences the check was asked about.")
    raw_answer: str | None = Field(None, description="The model's text before marker checks.")


class ChatMessage(BaseModel):
    role: str = Field(..., pattern="^(system|user|assistant)$")
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    stop: str | list[str] | None = None
    seed: int | None = None
    # ragqa extensions (the openai SDK sends them via extra_body)
    collection: str | None = None
    document_ids: list[int] | None = None
    top_k: int | None = Field(None, ge=1, le=50)
