"""Annotators: people (or programs) who label, each with a token scoped to some datasets of one tenant.

Annotators belong to the labeling service, so their tokens are issued and verified here (stored hashed,
like partner keys). Requests carry `Authorization: Bearer fwa_…`.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import current_app, g, request
from sqlalchemy import select

from services.labeling.models import Annotator
from shared.auth import hash_api_key
from shared.errors import Unauthorized
from shared.logging import log_context
from shared.runtime import Runtime

TOKEN_PREFIX = "fwa_"  # noqa: S105 - a public prefix, not a secret


def create_annotator(runtime: Runtime, tenant: str, name: str, datasets: list[str]) -> tuple[Annotator, str]:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    annotator = Annotator(
        id=f"ann_{uuid.uuid4().hex[:20]}",
        tenant=tenant,
        name=name,
        token_hash=hash_api_key(token),
        datasets=sorted(set(datasets)),
        active=True,
    )
    with runtime.db.session() as session:
        session.add(annotator)
    return annotator, token


def require_annotator(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX):
            raise Unauthorized("send an annotator token: 'Authorization: Bearer fwa_…'")
        runtime: Runtime = current_app.extensions["flywheel"]
        with runtime.db.session() as session:
            annotator = session.scalar(
                select(Annotator).where(Annotator.token_hash == hash_api_key(token), Annotator.active.is_(True))
            )
        if annotator is None:
            raise Unauthorized("invalid or deactivated annotator token")
        g.annotator = annotator
        with log_context(tenant=annotator.tenant, annotator_id=annotator.id):
            return view(*args, **kwargs)

    wrapper._flywheel_auth = {"annotator": True}  # type: ignore[attr-defined]
    return wrapper


def current_annotator() -> Annotator:
    return g.annotator
