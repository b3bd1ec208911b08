"""Reject oversized uploads with 413 before the body is read (ASGI middleware).

A declared Content-Length over the limit is refused at once; a body without one is
counted as it streams in and cut off as soon as it passes the limit.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]


class _TooLarge(Exception):
    pass


class UploadLimit:
    def __init__(self, app: Any, *, max_bytes: int, path_prefix: str = "/v1/documents") -> None:
        self.app = app
        # Multipart framing and the small form fields ride along with the file.
        self.max_body = max_bytes + 1024 * 1024
        self.max_bytes = max_bytes
        self.path_prefix = path_prefix

    async def _reject(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"upload is larger than the limit of {self.max_bytes} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith(self.path_prefix)
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._reject(send)
