"""Reading side of the API: /v1/ask (JSON or SSE) and the OpenAI-compatible chat API."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.answer import AnswerEvent, AskInput
from app.deps import AnswererDep, ServicesDep, SessionDep
from app.errors import NotFound, Unprocessable
from app.schemas import AskRequest, AskResponse, ChatRequest
from generation.params import GenerationParams, ParamError
from ingest import repo

router = APIRouter()


def _check_question(question: str, limit: int) -> str:
    question = question.strip()
    if not question:
        raise Unprocessable("question must not be empty")
    if len(question) > limit:
        raise Unprocessable(f"question must be at most {limit} characters, got {len(question)}")
    return question


def _check_collection(session: Any, collection: str | None) -> None:
    if collection is not None and not repo.collection_exists(
        session=session, collection=collection
    ):
        raise NotFound(f"collection {collection!r} not found")


def _params(**kwargs: Any) -> GenerationParams:
    try:
        return GenerationParams(**{k: v for k, v in kwargs.items() if v is not None})
    except ParamError as exc:
        raise Unprocessable(str(exc)) from exc


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post("/ask", response_model=AskResponse)
async def ask(
    body: AskRequest, services: ServicesDep, session: SessionDep, answerer: AnswererDep
) -> Any:
    """Answer a question from the documents, with citations, or refuse."""
    settings = services.settings
    question = _check_question(body.question, settings.max_question_chars)
    _check_collection(session, body.collection)
    session.close()
    inp = AskInput(
        question=question,
        collection=body.collection,
        document_ids=body.document_ids,
        top_k=body.top_k or settings.top_k,
        params=_params(
            max_new_tokens=body.max_tokens or settings.max_answer_tokens,
            temperature=body.temperature,
        ),
        debug=body.debug,
    )
    if not body.stream:
        return await answerer.answer(inp)

    async def events() -> AsyncIterator[str]:
        async for ev in answerer.stream(inp):
            if ev.kind == "delta":
                yield _sse("delta", {"text": ev.text})
            else:
                yield _sse(ev.kind, ev.data)

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/models")
def list_models(services: ServicesDep) -> dict[str, Any]:
    status = services.generator_status.as_dict()
    return {
        "object": "list",
        "data": [
            {
                "id": services.settings.generator,
                "object": "model",
                "created": 0,
                "owned_by": "ragqa",
                "ready": status["state"] == "ready",
            }
        ],
    }


def _chat_input(body: ChatRequest, services: Any) -> AskInput:
    settings = services.settings
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise Unprocessable("the last message must come from the user")
    question = _check_question(turns[-1].content, settings.max_question_chars)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return AskInput(
        question=question,
        collection=body.collection,
        document_ids=body.document_ids,
        top_k=body.top_k or settings.top_k,
        params=_params(
            max_new_tokens=body.max_tokens or settings.max_answer_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(stop) if stop else None,
            seed=body.seed,
        ),
        history=[{"role": m.role, "content": m.content} for m in turns[:-1]],
    )


@router.post("/chat/completions")
async def chat_completions(
    body: ChatRequest, services: ServicesDep, session: SessionDep, answerer: AnswererDep
) -> Any:
    """OpenAI-compatible chat: RAG over the conversation; citations in an extra field."""
    inp = _chat_input(body, services)
    _check_collection(session, body.collection)
    session.close()
    model = services.settings.generator
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        out = await answerer.answer(inp)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["answer"]},
                    "finish_reason": out.get("finish_reason", "stop"),
                }
            ],
            "usage": {
                **out["usage"],
                "total_tokens": out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"],
            },
            "citations": out["citations"],
            "refused": out["refused"],
        }

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        payload = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        citations: dict[str, Any] = {}
        ev: AnswerEvent
        async for ev in answerer.stream(inp):
            if ev.kind == "delta":
                yield chunk({"content": ev.text})
            elif ev.kind == "citations":
                citations = ev.data
            elif ev.kind == "done":
                usage = ev.data["usage"]
                usage = {**usage, "total_tokens": sum(usage.values())}
                yield chunk(
                    {},
                    ev.data.get("finish_reason", "stop"),
                    citations=citations.get("citations", []),
                    refused=citations.get("refused", False),
                    usage=usage,
                )
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
