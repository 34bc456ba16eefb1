"""localstripe (a stateful Stripe stand-in from PyPI) for the Stripe adapter's tests: started on a
free local port (fixture `localstripe_url` in conftest.py), the tests' own Stripe client, and
payments made on it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import stripe

from devstack.embedded import free_port

API_KEY = "sk_test_ordercancel"
LOCALSTRIPE = str(Path(sys.executable).parent / "localstripe")


@contextmanager
def running_localstripe(log_dir: Path) -> Iterator[str]:
    """localstripe on a free port, from scratch; yields its base URL."""
    port = free_port()
    log = (log_dir / "localstripe.log").open("w")
    proc = subprocess.Popen(
        [LOCALSTRIPE, "--port", str(port), "--from-scratch"], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "localstripe exited at start"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "localstripe did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def stripe_client_for(localstripe_url: str) -> stripe.StripeClient:
    """The test's own view of "Stripe", to set up payments and look behind the adapter."""
    return stripe.StripeClient(
        API_KEY,
        base_addresses={"api": localstripe_url},
        max_network_retries=0,
        http_client=stripe.HTTPXClient(),
    )


async def payment_intent(client: stripe.StripeClient, amount: int, *, captured: bool) -> Any:
    """A card payment of `amount` cents: authorised only (capture_method manual) or captured."""
    method = await client.v1.payment_methods.create_async(
        {
            "type": "card",
            "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    intent = await client.v1.payment_intents.create_async(
        {
            "amount": amount,
            "currency": "eur",
            "payment_method": method.id,
            "capture_method": "automatic" if captured else "manual",
            "confirm": True,
        }
    )
    assert intent.status == ("succeeded" if captured else "requires_capture"), intent.status
    return intent
