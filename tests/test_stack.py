"""How a command finds its servers (infra/stack.py): the configured ones, else the running dev
stack's PostgreSQL named in `<data dir>/dev-stack.json`; never a server started behind the
user's back, and a clear one-line error when there is nothing to talk to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import asyncpg
import pytest
from helpers.stacks import run_command

from infra.settings import Settings
from infra.stack import DEV_STACK_FILE, open_stack

ORDERCANCEL = str(Path(sys.executable).parent / "ordercancel")


def _no_servers(data_dir: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": "",
        "ORDERCANCEL_DATABASE_URL": "",
        "TEMPORAL_ADDRESS": "",
        "ORDERCANCEL_DATA_DIR": str(data_dir),
    }


async def test_a_command_without_servers_says_how_to_get_them(tmp_path: Path) -> None:
    ran = await run_command(
        ORDERCANCEL, "status", "cancel-O-1-S-1", env=_no_servers(tmp_path), timeout=60
    )
    assert ran.returncode == 1, ran.stderr
    assert "DATABASE_URL is not set and no dev stack is running" in ran.stderr
    assert "make run" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not (tmp_path / "pg").exists(), "no PostgreSQL may be started by a one-off command"


async def test_a_dev_stack_that_has_stopped_is_reported_not_waited_for(tmp_path: Path) -> None:
    (tmp_path / DEV_STACK_FILE).write_text(
        json.dumps({"database_url": f"postgresql://nobody@/ledger?host={tmp_path}/gone"})
    )
    ran = await run_command(
        ORDERCANCEL, "status", "cancel-O-1-S-1", env=_no_servers(tmp_path), timeout=60
    )
    assert ran.returncode == 1, ran.stderr
    assert "cannot reach PostgreSQL" in ran.stderr and DEV_STACK_FILE in ran.stderr
    assert "Traceback" not in ran.stderr


async def test_the_running_dev_stacks_database_is_used(
    tmp_path: Path, database_url: str, temporal_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "ORDERCANCEL_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / DEV_STACK_FILE).write_text(json.dumps({"database_url": database_url}))
    settings = Settings(data_dir=tmp_path, temporal_address=temporal_address)
    direct = await asyncpg.connect(database_url)
    try:
        expected = await direct.fetchval("SELECT current_database()")
    finally:
        await direct.close()
    async with open_stack(settings) as stack:
        assert await stack.pool.fetchval("SELECT current_database()") == expected
        assert stack.client.namespace == "default"
