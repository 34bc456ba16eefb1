"""The webhook signature (docs/events.md): `HMAC-SHA256(secret, f"{timestamp}.{body}")`, hex,
sent as `Ordercancel-Signature: v1=<hex>` with `Ordercancel-Timestamp: <unix seconds>`."""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "Ordercancel-Timestamp"
SIGNATURE_HEADER = "Ordercancel-Signature"
EVENT_ID_HEADER = "Ordercancel-Event-Id"
EVENT_TYPE_HEADER = "Ordercancel-Event-Type"

# How old a signed timestamp a receiver accepts by default (replays of a captured request).
DEFAULT_TOLERANCE_SECONDS = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def signed_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify(
    secret: str,
    body: bytes,
    timestamp: str | None,
    sent: str | None,
    *,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """What a receiver does: the timestamp is recent and the signature is the body's."""
    if not timestamp or not sent or not timestamp.isdigit():
        return False
    if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, int(timestamp), body), sent)
