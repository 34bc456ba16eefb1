"""structlog processors: Temporal's log context as fields, and secrets kept out of every line.

`temporal_context` turns what the Temporal SDK attaches to its stdlib records (`extra` of
`workflow.logger` and `activity.logger`: a `temporal_workflow` / `temporal_activity` dict) and
any other `extra` into top-level fields, so a line is `{"workflow_id": ..., "run_id": ...}`, not
a dict printed into the message.

`redact` runs last, on every line: values under secret-looking keys are replaced, and in any
string (messages, errors, tracebacks) URL passwords, secret query parameters and card numbers
are masked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from structlog.types import EventDict, WrappedLogger
from temporalio.exceptions import ApplicationError

REDACTED = "[REDACTED]"

# The SDK's context keys, renamed to this service's field names. A workflow's own attempt is
# `workflow_attempt`: `attempt` means an activity attempt.
_TEMPORAL_EXTRA: Mapping[str, Mapping[str, str]] = {
    "temporal_workflow": {
        "workflow_id": "workflow_id",
        "run_id": "run_id",
        "workflow_type": "workflow_type",
        "task_queue": "task_queue",
        "namespace": "namespace",
        "attempt": "workflow_attempt",
        "update_id": "update_id",
        "update_name": "update_name",
    },
    "temporal_activity": {
        "workflow_id": "workflow_id",
        "workflow_run_id": "run_id",
        "workflow_type": "workflow_type",
        "activity_type": "activity",
        "activity_id": "activity_id",
        "attempt": "attempt",
        "task_queue": "task_queue",
        "namespace": "namespace",
    },
}
# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
# Whole objects the SDK can attach (full_*_info_on_extra); not log material.
_SKIPPED_EXTRA = frozenset({"workflow_info", "activity_info"})


def temporal_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Lift a stdlib record's `extra` into fields (for `foreign_pre_chain`). Values already
    bound (context variables) win: they are the same ids."""
    record = event_dict.get("_record")
    if not isinstance(record, logging.LogRecord):
        return event_dict
    for key, value in record.__dict__.items():
        if key in _RECORD_ATTRIBUTES or key.startswith("_") or key in _SKIPPED_EXTRA:
            continue
        renames = _TEMPORAL_EXTRA.get(key)
        if renames is not None and isinstance(value, Mapping):
            for src, dst in renames.items():
                if src in value:
                    event_dict.setdefault(dst, value[src])
        else:
            event_dict.setdefault(key, value)
    return event_dict


# Keys whose values are secrets or card data, whatever they hold.
_SECRET_KEY = re.compile(
    r"""^(?:
        database_url | .*_dsn | dsn | .*password.* | passwd | pwd | .*secret.*
      | api[_-]?key | .*_api_key | .*token | authorization | proxy[_-]authorization
      | cookie | set[_-]cookie | card.* | .*_card | pan | cvv | cvc | security_code
    )$""",
    re.IGNORECASE | re.VERBOSE,
)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+(?=@)")
# ?password=... / &api_key=... in URLs and DSNs
_SECRET_PARAM = re.compile(
    r"(?P<head>[?&;\s](?:password|passwd|pwd|secret|api_key|apikey|token|access_token)=)"
    r"[^&;\s]+",
    re.IGNORECASE,
)
# 13-19 digits, optionally grouped by spaces or dashes; masked when they pass the Luhn check
# (amounts and ids of that length almost never do by chance, ~10%, and keep their last digits).
_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if not _luhn_ok(digits):
        return match.group(0)
    return f"[CARD ****{digits[-4:]}]"


# What every match of the three patterns above contains: "://", "=", or 13 digits. Most log
# values hold none of them (ids, statuses, kinds), and one search spares them three scans.
_SUSPECT = re.compile(r"://|=|\d(?:[ -]?\d){12}")


def redact_text(text: str) -> str:
    if _SUSPECT.search(text) is None:
        return text
    return _redact_all(text)


def _redact_all(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<head>***", text)
    text = _SECRET_PARAM.sub(r"\g<head>***", text)
    return _CARD_CANDIDATE.sub(_mask_card, text)


# Whether a key names a secret, by key: a service logs the same few dozen keys on every line.
# Bounded, so that keys built from data (a mapping's keys) cannot grow it without limit.
_SECRET_KEYS_SEEN: dict[str, bool] = {}
_SECRET_KEYS_SEEN_MAX = 4096


def _is_secret_key(key: str) -> bool:
    secret = _SECRET_KEYS_SEEN.get(key)
    if secret is None:
        secret = _SECRET_KEY.match(key) is not None
        if len(_SECRET_KEYS_SEEN) < _SECRET_KEYS_SEEN_MAX:
            _SECRET_KEYS_SEEN[key] = secret
    return secret


def _redact_value(key: str | None, value: Any) -> Any:
    if key is not None and _is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(None, v) for v in value]
    return value


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Mask secrets and card numbers in every field (run after exceptions are formatted).

    A line's plain strings (most of its fields: ids, statuses, the event) are looked at in one
    search, and one by one only when that finds something suspect: this runs on every line."""
    strings: list[str] = []
    for key, value in event_dict.items():
        if key.startswith("_"):  # the formatter's own bookkeeping (_record, _from_structlog)
            continue
        if _is_secret_key(key):
            if value not in (None, ""):
                event_dict[key] = REDACTED
        elif type(value) is str:
            strings.append(key)
        elif value is not None and not isinstance(value, int | float):
            event_dict[key] = _redact_value(key, value)
    # A newline cannot be part of a match: joined, the strings match only where one does.
    if strings and _SUSPECT.search("\n".join(event_dict[k] for k in strings)) is not None:
        for key in strings:
            event_dict[key] = redact_text(event_dict[key])
    return event_dict


def expected_failure(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """An activity failure the product raises on purpose (an `ApplicationError` with a type, e.g.
    `ProviderUnavailable` while the provider is down, retried by the workflow) is one line with
    `error="Type: message"`, not a traceback: the type says all an operator needs. Anything
    else keeps its traceback."""
    exc_info = event_dict.get("exc_info")
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        error = exc_info[1]
    elif isinstance(exc_info, BaseException):
        error = exc_info
    else:
        return event_dict
    if isinstance(error, ApplicationError) and error.type:
        del event_dict["exc_info"]
        event_dict["error"] = f"{error.type}: {error.message}"
    return event_dict
