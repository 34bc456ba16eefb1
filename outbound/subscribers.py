"""Who receives the events: subscribers from configuration (docs/configuration.md).

`ORDERCANCEL_SUBSCRIBERS` holds a JSON list, or `ORDERCANCEL_SUBSCRIBERS_FILE` names a file
holding one: `[{"name": "notifications", "url": "https://...", "secret": "...",
"types": ["cancellation.requested"]}]` (`types` optional: every type when absent).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError

EVENT_TYPES = (
    "cancellation.requested",
    "cancellation.approved",
    "cancellation.rejected",
    "cancellation.withdrawn",
    "cancellation.escalated",
    "cancellation.message",
    "refund.stage_changed",
    "refund.failed",
    "coupon.decided",
)


class Subscriber(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # A metric label and the key of its position in the ledger: short and plain.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    url: str = Field(pattern=r"^https?://")
    secret: SecretStr = Field(min_length=16)
    types: frozenset[str] | None = None

    def wants(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types


class SubscribersError(ValueError):
    """The subscriber configuration is wrong: the message says where."""


def parse_subscribers(text: str, *, source: str) -> list[Subscriber]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SubscribersError(f"{source}: not JSON ({err.msg} at line {err.lineno})") from err
    try:
        subscribers = TypeAdapter(list[Subscriber]).validate_python(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise SubscribersError(f"{source}: {problems}") from None
    names = [s.name for s in subscribers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SubscribersError(f"{source}: subscriber names must be unique: {duplicates}")
    for sub in subscribers:
        unknown = sorted((sub.types or frozenset()) - set(EVENT_TYPES))
        if unknown:
            raise SubscribersError(
                f"{source}: subscriber {sub.name}: unknown event types {unknown}"
                f" (known: {', '.join(EVENT_TYPES)})"
            )
    return subscribers


def load_subscribers(inline: str | None, file: Path | None) -> list[Subscriber]:
    """The subscribers of ORDERCANCEL_SUBSCRIBERS and ORDERCANCEL_SUBSCRIBERS_FILE together."""
    found: list[Subscriber] = []
    if inline:
        found += parse_subscribers(inline, source="ORDERCANCEL_SUBSCRIBERS")
    if file is not None:
        try:
            text = file.read_text()
        except OSError as err:
            raise SubscribersError(f"ORDERCANCEL_SUBSCRIBERS_FILE {file}: {err.strerror}") from err
        found += parse_subscribers(text, source=str(file))
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise SubscribersError("a subscriber name appears in both settings")
    return found
