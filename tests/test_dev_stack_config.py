"""The dev stack on ports of the user's choosing (`ORDERCANCEL_TEMPORAL_PORT`, on a machine where
another developer's Temporal has 7233), found by one-off commands in another terminal through
`<data dir>/dev-stack.json`; and what `make run` prints about its API (issue: user trial)."""

from __future__ import annotations

import io
import json
import socket
import sys
import uuid
from pathlib import Path

import pytest
from helpers.stacks import run_command
from rich.console import Console
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest

from devstack.dev_api import DEV_PRINCIPALS, dev_banner, dev_credentials, print_banner
from devstack.embedded import TemporalDevServer, free_port
from devstack.stack import open_dev_stack
from infra.settings import Settings
from infra.stack import DEV_STACK_FILE, open_stack, temporal_server

ORDERCANCEL = str(Path(sys.executable).parent / "ordercancel")
# A fresh terminal: none of the user's servers configured.
UNSET = (
    "DATABASE_URL",
    "ORDERCANCEL_DATABASE_URL",
    "TEMPORAL_ADDRESS",
    "ORDERCANCEL_TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "ORDERCANCEL_TEMPORAL_NAMESPACE",
    "ORDERCANCEL_TEMPORAL_PORT",
    "TEMPORAL_CONFIG_FILE",
    "TEMPORAL_PROFILE",
)


@pytest.fixture
def fresh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.e2e
async def test_a_command_in_another_terminal_reaches_a_dev_stack_on_other_ports(
    tmp_path: Path, fresh_env: None
) -> None:
    namespace = f"dev-{uuid.uuid4().hex[:8]}"
    grpc_port, ui_port = free_port(), free_port()
    dev = Settings(
        data_dir=tmp_path, temporal_port=grpc_port, ui_port=ui_port, temporal_namespace=namespace
    )
    async with open_dev_stack(dev):
        recorded = json.loads((tmp_path / DEV_STACK_FILE).read_text())
        assert recorded["temporal_address"] == f"127.0.0.1:{grpc_port}"
        assert recorded["temporal_namespace"] == namespace
        assert "database_url" in recorded

        # Another terminal: only the data dir in common, the default Temporal port configured.
        other = Settings(data_dir=tmp_path)
        assert other.temporal_port == 7233
        assert temporal_server(other) == (f"127.0.0.1:{grpc_port}", namespace)
        async with open_stack(other) as stack:
            assert stack.client.namespace == namespace
            # The dev stack's server answers for its namespace (no other server knows it).
            await stack.client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=namespace)
            )

        # A CLI command, in a fresh environment, talks to it.
        env = {"ORDERCANCEL_DATA_DIR": str(tmp_path)}  # the rest unset by fresh_env
        ran = await run_command(ORDERCANCEL, "list", "--json", env=env, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["items"] == []
    assert not (tmp_path / DEV_STACK_FILE).exists(), "the record goes with the dev stack"


def test_a_configured_temporal_address_wins_over_the_dev_stacks(tmp_path: Path) -> None:
    (tmp_path / DEV_STACK_FILE).write_text(
        json.dumps({"temporal_address": "127.0.0.1:7381", "temporal_namespace": "dev"})
    )
    own = Settings(data_dir=tmp_path, temporal_address="temporal.internal:7233")
    assert temporal_server(own) == ("temporal.internal:7233", "default")
    # An explicit namespace wins over the recorded one, on the recorded server.
    explicit = Settings(data_dir=tmp_path, temporal_namespace="mine")
    assert temporal_server(explicit) == ("127.0.0.1:7381", "mine")
    # No dev stack running: the default dev server's port.
    (tmp_path / DEV_STACK_FILE).unlink()
    assert temporal_server(Settings(data_dir=tmp_path)) == ("127.0.0.1:7233", "default")


@pytest.mark.parametrize("which", ["gRPC", "UI"])
async def test_a_taken_temporal_port_names_the_setting_to_change(which: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if which == "gRPC":
            server = TemporalDevServer(port=port, ui_port=None, db_file=None)
            setting = "ORDERCANCEL_TEMPORAL_PORT"
        else:
            server = TemporalDevServer(port=free_port(), ui_port=port, db_file=None)
            setting = "ORDERCANCEL_UI_PORT"
        with pytest.raises(RuntimeError) as refused:
            await server.start(timeout=20)
    message = str(refused.value)
    assert f"{which} port 127.0.0.1:{port} is already in use" in message
    assert setting in message
    assert server.pid is None


def _printed(banner: str, width: int) -> list[str]:
    out = io.StringIO()
    print_banner(Console(file=out, width=width, force_terminal=False), banner)
    return out.getvalue().splitlines()


def test_the_banner_exports_every_dev_key_on_lines_that_never_wrap(tmp_path: Path) -> None:
    credentials = dev_credentials(tmp_path)
    secret = credentials.webhook_secret
    banner = dev_banner(Settings(), "http://127.0.0.1:8080", credentials, secret)
    lines = _printed(banner, width=60)
    exports = dict(
        line.strip().removeprefix("export ").split("=", 1)
        for line in lines
        if line.strip().startswith("export ")
    )
    assert exports["API"] == "http://127.0.0.1:8080"
    # The README's names, and one for every other dev principal.
    assert exports["BUYER_KEY"] == credentials.keys["buyer-service"]
    assert exports["SRE_KEY"] == credentials.keys["sre"]
    assert exports["ORDER_SYSTEM_KEY"] == credentials.keys["order-system"]
    assert exports["PAYMENT_PROVIDER_KEY"] == credentials.keys["payment-provider"]
    for seller in ("S-1", "S-2", "S-7", "S-8"):
        assert (
            exports[f"SELLER_{seller.replace('-', '')}_KEY"] == credentials.keys[f"seller:{seller}"]
        )
    assert set(credentials.keys.values()) <= set(exports.values())
    assert len(exports) == len(DEV_PRINCIPALS) + 2  # API, the keys, PAYMENT_WEBHOOK_SECRET
    # Printed at 60 columns, every line is whole: the banner's own lines, none split.
    assert lines == banner.splitlines()
    secret_line = next(line for line in lines if secret in line and "export" not in line)
    assert "/v1/payment-events" in secret_line
    stripe_line = next(line for line in lines if "stripe/webhook" in line)
    assert "off" in stripe_line and "ORDERCANCEL_STRIPE_WEBHOOK_SECRET" in stripe_line


def test_the_banner_says_when_stripes_webhook_is_on(tmp_path: Path) -> None:
    from pydantic import SecretStr

    settings = Settings(stripe_webhook_secret=SecretStr("whsec_" + "k" * 40))
    banner = dev_banner(settings, "http://127.0.0.1:8080", dev_credentials(tmp_path), None)
    stripe_line = next(line for line in banner.splitlines() if "stripe/webhook" in line)
    assert ": on" in stripe_line
    assert "k" * 40 not in banner, "Stripe's secret is the user's: never printed"


async def test_make_run_refuses_a_placeholder_stripe_secret_before_starting_anything(
    tmp_path: Path, fresh_env: None
) -> None:
    env = {
        "ORDERCANCEL_DATA_DIR": str(tmp_path),
        "ORDERCANCEL_STRIPE_WEBHOOK_SECRET": "whsec_example",
    }
    ran = await run_command(ORDERCANCEL, "dev", "--no-demo", env=env, timeout=60)
    assert ran.returncode == 1, ran.stderr
    assert "ORDERCANCEL_STRIPE_WEBHOOK_SECRET" in ran.stderr and "placeholder" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not (tmp_path / "pg").exists(), "no server is started on a refused configuration"
