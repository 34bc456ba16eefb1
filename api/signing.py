"""Webhook signatures: HMAC-SHA256 over `<timestamp>.<raw body>` with the shared secret.

Header: `Ordercancel-Signature: t=<unix seconds>,v1=<hex digest>` (Stripe's scheme). The
timestamp is signed with the body, so a captured request cannot be replayed after the tolerance;
several `v1=` values may be sent while the provider rotates its secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import timedelta

SIGNATURE_HEADER = "Ordercancel-Signature"
# A Unix time in seconds has 10 digits until the year 2286; more than 12 is no clock's. Longer
# would overflow the float the age is computed in, or int()'s digit limit (a 500, issue 18).
_MAX_TIMESTAMP_DIGITS = 12


@dataclass(frozen=True)
class SignatureRefused(Exception):
    """Why a signature was refused: `code` for machines, `message` for people."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def compute_signature(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={compute_signature(secret, timestamp, body)}"


def verify_signature(
    secret: str, header: str | None, body: bytes, *, now: float, tolerance: timedelta
) -> int:
    """Return the signed timestamp, or raise `SignatureRefused`."""
    if not header:
        raise SignatureRefused(
            "missing_signature", f"the {SIGNATURE_HEADER} header is required (t=<unix>,v1=<hex>)"
        )
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if (
            name == "t"
            and value.isascii()
            and value.isdigit()
            and len(value) <= _MAX_TIMESTAMP_DIGITS
        ):
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureRefused(
            "malformed_signature",
            f"the {SIGNATURE_HEADER} header must read t=<unix seconds>,v1=<hex digest>",
        )
    age = now - timestamp
    if abs(age) > tolerance.total_seconds():
        raise SignatureRefused(
            "stale_signature",
            f"the signature timestamp is {int(abs(age))} s {'old' if age > 0 else 'ahead'};"
            f" at most {int(tolerance.total_seconds())} s is accepted",
        )
    expected = compute_signature(secret, timestamp, body).encode()
    # Every candidate is compared, in constant time each; as bytes, since a header may hold
    # any latin-1 text and `compare_digest` takes only ASCII strings.
    given = [c.strip().lower().encode("latin-1", "replace") for c in candidates]
    if not any([hmac.compare_digest(expected, g) for g in given]):
        raise SignatureRefused(
            "bad_signature",
            "the signature does not match the body (HMAC-SHA256 of '<t>.<raw body>' with the"
            " shared secret)",
        )
    return timestamp
