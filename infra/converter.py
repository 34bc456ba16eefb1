"""The data converter of every client and worker: the SDK's pydantic one, except that a message
argument it cannot decode reaches the workflow's handler as a value the handler refuses.

Signal and update handlers take `*args: Any` (workflows/handlers.py), so the SDK decodes their
arguments with no type. A payload that pydantic's JSON parser refuses (a lone surrogate in raw
JSON, bytes that are not UTF-8) or whose encoding no converter knows would otherwise make the SDK
refuse the update itself ("Failed decoding arguments") and drop the signal unrecorded: any
client other than ours could send one. Here each such argument becomes a
`domain.errors.UndecodablePayload`, which `workflows.messages.parse` refuses as
`invalid_payload`, counted and recorded like any malformed message (R20).

The workflow's own input is untyped too (`OrderCancellation.__init__(*args)`): an undecodable
start fails its run with `invalid_payload` instead of failing its workflow task for ever. Only
untyped decoding is lenient: activity inputs and results have types and fail as before.
Decoding stays a pure function of the payload's bytes (replay-safe).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import (
    PydanticJSONPlainPayloadConverter,
    PydanticPayloadConverter,
)
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)

from domain.errors import UndecodablePayload

ERROR_LIMIT = 200


# One cache of pydantic type adapters for the process. The SDK makes a payload converter for
# every workflow run, each with a cache of its own, so each run built again the adapters of the
# activity results it decodes (a few per cancellation, costly inside the sandbox). The types
# are the product's models (passed through the sandbox: one class each for the process);
# the bound keeps a class that is not (a type defined in a sandboxed module) from piling up.
_shared_type_adapter = functools.lru_cache(maxsize=512)(TypeAdapter)


class SharedAdapterJSONConverter(PydanticJSONPlainPayloadConverter):
    """The SDK's pydantic JSON converter, with the process's type adapters."""

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        hint: Any = type_hint if type_hint is not None else Any
        try:
            adapter = _shared_type_adapter(hint)
        except TypeError:  # an unhashable hint (or one pydantic refuses): as the SDK does it
            return super().from_payload(payload, type_hint)
        return adapter.validate_json(payload.data)


# The encodings, as PydanticPayloadConverter orders them, built once: each is stateless (the
# JSON one's adapters are the process's), as the SDK's own default ones are, shared by every
# instance. The SDK makes an instance for every workflow run and more (about ten per
# cancellation), and building the pydantic serializer each time showed in the profiles.
_ENCODINGS = tuple(
    SharedAdapterJSONConverter() if isinstance(c, JSONPlainPayloadConverter) else c
    for c in DefaultPayloadConverter.default_encoding_payload_converters
)


class MessagePayloadConverter(PydanticPayloadConverter):
    def __init__(self) -> None:
        CompositePayloadConverter.__init__(self, *_ENCODINGS)

    def from_payloads(
        self, payloads: Sequence[Payload], type_hints: list[type] | None = None
    ) -> list[Any]:
        if type_hints is not None:
            return super().from_payloads(payloads, type_hints)
        values: list[Any] = []
        for payload in payloads:
            try:
                values.extend(super().from_payloads([payload], None))
            except Exception as err:  # whatever a decoder raises: refused by the handler
                encoding = payload.metadata.get("encoding", b"").decode("utf-8", "replace")
                cause = err.__cause__ or err
                values.append(
                    UndecodablePayload(
                        encoding=encoding or "(none)",
                        error=f"{type(cause).__name__}: {cause}"[:ERROR_LIMIT],
                    )
                )
        return values


data_converter = DataConverter(payload_converter_class=MessagePayloadConverter)
