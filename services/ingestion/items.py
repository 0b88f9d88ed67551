"""Reading items: cursor-paged listings and signed short-lived download URLs.

Erasing them (an item, a data subject's, a retention period's) is `erasure.py`'s.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_, select

from services.ingestion.models import Item
from shared.errors import BadRequest, NotFound, ServiceUnavailable, Unauthorized
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

DOWNLOAD_TTL_SECONDS = 15 * 60


def list_items(runtime: Runtime, tenant: str, dataset_id: str, query: dict[str, Any]) -> dict[str, Any]:
    statement = select(Item).where(Item.tenant == tenant, Item.dataset_id == dataset_id)
    if "kind" in query:
        statement = statement.where(Item.kind == query["kind"])
    if "label" in query:
        statement = statement.where(Item.label == query["label"])
    if "labeled" in query:
        statement = statement.where(Item.label.is_not(None) if query["labeled"] else Item.label.is_(None))
    if query.get("cursor"):
        created_at, item_id = _decode_cursor(query["cursor"])
        statement = statement.where(
            or_(Item.created_at > created_at, and_(Item.created_at == created_at, Item.id > item_id))
        )
    limit = query["limit"]
    with runtime.db.session() as session:
        items = session.scalars(statement.order_by(Item.created_at, Item.id).limit(limit + 1)).all()
    next_cursor = _encode_cursor(items[limit - 1]) if len(items) > limit else None
    return {"items": items[:limit], "next_cursor": next_cursor}


def _encode_cursor(item: Item) -> str:
    created = item.created_at.replace(tzinfo=None).isoformat()
    return base64.urlsafe_b64encode(f"{created}|{item.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, item_id = raw.split("|", 1)
        return datetime.fromisoformat(created), item_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("invalid cursor; pass back the next_cursor of the previous page") from exc


def tenant_item(runtime: Runtime, tenant: str, item_id: str) -> Item:
    with runtime.db.session() as session:
        item = session.get(Item, item_id)
    if item is None or item.tenant != tenant:
        raise NotFound(f"item {item_id} does not exist")
    return item


def _signing_key(runtime: Runtime) -> bytes:
    secret = runtime.settings.internal_token
    if not secret:
        raise ServiceUnavailable("download URLs need FLYWHEEL_INTERNAL_TOKEN to be configured")
    return hashlib.sha256(b"flywheel-download:" + secret.encode()).digest()


def sign(runtime: Runtime, item_id: str, expires: int) -> str:
    return hmac.new(_signing_key(runtime), f"{item_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def download_url(runtime: Runtime, base_url: str, item: Item) -> dict[str, Any]:
    expires = int(time.time()) + DOWNLOAD_TTL_SECONDS
    signature = sign(runtime, item.id, expires)
    return {
        "url": f"{base_url.rstrip('/')}/v1/items/{item.id}/content?expires={expires}&signature={signature}",
        "expires_at": datetime.fromtimestamp(expires, UTC),
    }


def signed_content(runtime: Runtime, item_id: str, expires: int, signature: str) -> Item:
    """The item a signed URL names, if the signature is ours and has not expired."""
    expected = sign(runtime, item_id, expires)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise Unauthorized("invalid download signature")
    if expires < time.time():
        raise Unauthorized("this download URL has expired; ask for a new one")
    with runtime.db.session() as session:
        item = session.get(Item, item_id)
    if item is None:
        raise NotFound(f"item {item_id} does not exist")
    return item


def read_content(runtime: Runtime, item: Item) -> bytes:
    if item.offset is None:
        data = runtime.storage.get_bytes(item.bucket, item.object_key)
    else:
        data = runtime.storage.get_range(item.bucket, item.object_key, item.offset, item.length)
    if hashlib.sha256(data).hexdigest() != item.sha256:
        log.error("item_content_mismatch", item_id=item.id)
        raise ServiceUnavailable("the item's stored content does not match its checksum")
    return data
