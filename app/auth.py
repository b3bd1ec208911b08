"""API-key checks: /v1 routes need a key when keys are configured; admin routes an admin key."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.errors import Forbidden, Unauthorized
from app.settings import ApiKeys


def _matches(candidate: str, keys: list[str]) -> bool:
    # Compare against every key, without stopping early, so timing reveals nothing.
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_user(keys: ApiKeys, request: Request) -> None:
    if not keys.enabled:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches(token, keys.user + keys.admin):
        raise Unauthorized("invalid API key")


def check_admin(keys: ApiKeys, request: Request) -> None:
    if not keys.enabled:
        return
    check_user(keys, request)
    token = bearer_token(request) or ""
    if not _matches(token, keys.admin):
        raise Forbidden("this route needs an admin key (configured as 'admin:<key>')")
