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

from collections.abc import Sequence
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter

from domain.errors import UndecodablePayload

ERROR_LIMIT = 200


class MessagePayloadConverter(PydanticPayloadConverter):
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
