"""`ordercancel dispatch`: deliver the outbox's events to the subscribers as signed webhooks.

- One task per subscriber, each with its own position in the ledger (`outbox_subscribers`): a
  subscriber that is down or slow delays only itself, and resumes from its position.
- Strict order per subscriber: its next event is sent only once the previous one was
  acknowledged (any 2xx). That keeps every cancellation's events in order (R16) with one
  number of state per subscriber, which `events replay` can move; the price is that one event
  a subscriber keeps refusing holds back its later events (of every cancellation) until it
  accepts it or an operator moves its position on (docs/runbook.md).
- At least once: the position moves only after the acknowledgement, so a crash between the
  two sends the event again; receivers deduplicate on the event's `id`.
- Retries forever, with exponential backoff (`ORDERCANCEL_DISPATCH_RETRY_INITIAL` doubling up
  to `..._RETRY_MAX`, 30 s by default): nothing is ever skipped, and a subscriber that comes
  back gets its next event within that cap.
- The lag gauges are refreshed every `ORDERCANCEL_DISPATCH_METRICS_INTERVAL` by a task of
  their own (one query per subscriber), so they keep moving while a subscriber's task waits
  out its backoff.
- A sequencer task gives positions to committed events (`outbox_sequence()`, migration 011);
  several dispatchers may run, one sequences at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import structlog

from infra.metrics import NO_DISPATCH_METRICS, DispatchMetrics, delivery_failure_reason
from infra.settings import Settings
from outbound.signing import EVENT_ID_HEADER, EVENT_TYPE_HEADER, signed_headers
from outbound.store import OutboundEvent, OutboxStore
from outbound.subscribers import Subscriber, load_subscribers

log = structlog.get_logger("dispatch")

BATCH = 100


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        subscribers: Sequence[Subscriber],
        *,
        metrics: DispatchMetrics = NO_DISPATCH_METRICS,
        poll_interval: timedelta = timedelta(seconds=1),
        retry_initial: timedelta = timedelta(seconds=1),
        retry_max: timedelta = timedelta(seconds=30),
        timeout: timedelta = timedelta(seconds=10),
        metrics_interval: timedelta = timedelta(seconds=5),
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._store = OutboxStore(pool)
        self._subscribers = list(subscribers)
        self._metrics = metrics
        self._poll = poll_interval.total_seconds()
        self._retry_initial = retry_initial.total_seconds()
        self._retry_max = retry_max.total_seconds()
        self._timeout = timeout.total_seconds()
        self._metrics_interval = metrics_interval.total_seconds()
        self._http = http

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: sequence, and deliver to every subscriber."""
        async with contextlib.AsyncExitStack() as exits:
            http = self._http
            if http is None:
                http = await exits.enter_async_context(
                    httpx.AsyncClient(headers={"User-Agent": "ordercancel-dispatch"})
                )
            tasks = [asyncio.create_task(self._sequencer(stop), name="outbox-sequencer")]
            for sub in self._subscribers:
                await self._store.ensure_subscriber(sub.name)
                tasks.append(
                    asyncio.create_task(self._deliver_loop(sub, http, stop), name=sub.name)
                )
            if self._subscribers:
                tasks.append(asyncio.create_task(self._lag_reporter(stop), name="outbox-lag"))
            log.info("dispatch_started", subscribers=[s.name for s in self._subscribers])
            if not self._subscribers:
                log.warning(
                    "dispatch_no_subscribers",
                    hint="set ORDERCANCEL_SUBSCRIBERS or ORDERCANCEL_SUBSCRIBERS_FILE",
                )
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            log.info("dispatch_stopped")

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def _sequencer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._store.sequence()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
                log.warning("outbox_sequence_failed", error=str(err))
            await self._sleep(stop, self._poll)

    async def _lag_reporter(self, stop: asyncio.Event) -> None:
        """Refresh every subscriber's lag gauges on a fixed period, whatever its delivery task
        is doing: a subscriber's task sleeping out a backoff would otherwise leave its
        oldest-undelivered age frozen at the last attempt's value (and the alert on it late)."""
        while not stop.is_set():
            for sub in self._subscribers:
                try:
                    await self._report_lag(sub.name)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
                    log.warning("dispatch_lag_report_failed", subscriber=sub.name, error=str(err))
            await self._sleep(stop, self._metrics_interval)

    def retry_delay(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt at one event: doubling from the
        initial wait, capped at the maximum, less up to 20 % of jitter."""
        delay = min(self._retry_initial * 2 ** min(max(attempts, 1) - 1, 30), self._retry_max)
        return delay * random.uniform(0.8, 1.0)

    async def _deliver_loop(
        self, sub: Subscriber, http: httpx.AsyncClient, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                moved = await self._deliver_batch(sub, http, stop)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
                # The ledger is unreachable: nothing is lost, the position is where it was.
                log.warning("dispatch_ledger_error", subscriber=sub.name, error=str(err))
                moved = False
            except Exception:
                # Never let one subscriber's task die quietly: log, wait, start again from the
                # stored position.
                log.exception("dispatch_subscriber_error", subscriber=sub.name)
                moved = False
            if not moved:
                await self._sleep(stop, self._poll)

    async def _deliver_batch(
        self, sub: Subscriber, http: httpx.AsyncClient, stop: asyncio.Event
    ) -> bool:
        """Deliver the next events after the subscriber's position as stored (re-read each
        batch: a replay may have moved it). True when the position moved."""
        position = await self._store.ensure_subscriber(sub.name)
        events = await self._store.events_after(position, limit=BATCH)
        await self._report_lag(sub.name)
        if not events:
            return False
        for event in events:
            if stop.is_set():
                return True
            if sub.wants(event.type):
                sent = await self._send(sub, http, event, stop, position)
                if sent is None:
                    log.info("dispatch_position_moved", subscriber=sub.name)
                    return True  # a replay moved the position while retrying: start from it
                if not sent:
                    return True  # stopped while retrying
            if not await self._store.delivered(sub.name, position, event.position):
                log.info("dispatch_position_moved", subscriber=sub.name)
                return True  # a replay moved the position: start again from it
            position = event.position
            if sub.wants(event.type):
                self._metrics.delivered(subscriber=sub.name)
        await self._report_lag(sub.name)
        return True

    async def _send(
        self,
        sub: Subscriber,
        http: httpx.AsyncClient,
        event: OutboundEvent,
        stop: asyncio.Event,
        expected: int,
    ) -> bool | None:
        """POST until a 2xx: True. False if stopped first; None when the subscriber's stored
        position is no longer `expected` (an operator's `events replay` moved it, e.g. to skip
        an event the subscriber keeps refusing): the event is not the next one any more."""
        body = event.body()
        while not stop.is_set():
            if await self._store.position(sub.name) != expected:
                return None
            headers = {
                "Content-Type": "application/json",
                EVENT_ID_HEADER: event.id,
                EVENT_TYPE_HEADER: event.type,
                **signed_headers(sub.secret.get_secret_value(), body),
            }
            status: int | None = None
            error: BaseException | None = None
            try:
                response = await http.post(
                    sub.url, content=body, headers=headers, timeout=self._timeout
                )
                status = response.status_code
                if 200 <= status < 300:
                    log.info(
                        "event_delivered",
                        subscriber=sub.name,
                        event_id=event.id,
                        type=event.type,
                        position=event.position,
                    )
                    return True
                detail = f"HTTP {status}"
            except httpx.HTTPError as err:
                error = err
                detail = f"{type(err).__name__}: {err}"
            reason = delivery_failure_reason(status, error)
            self._metrics.failed(subscriber=sub.name, reason=reason)
            attempts = await self._store.failed(sub.name, detail)
            delay = self.retry_delay(attempts)
            log.warning(
                "event_delivery_failed",
                subscriber=sub.name,
                event_id=event.id,
                position=event.position,
                reason=reason,
                error=detail,
                attempts=attempts,
                retry_in=round(delay, 2),
            )
            await self._report_lag(sub.name)
            await self._wait_to_retry(sub.name, expected, stop, delay)
        return False

    async def _wait_to_retry(
        self, name: str, expected: int, stop: asyncio.Event, delay: float
    ) -> None:
        """Wait `delay` seconds before the next attempt, looking at the stored position every
        second: a replay takes effect within a second, not after the backoff."""
        deadline = asyncio.get_running_loop().time() + delay
        while not stop.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await self._sleep(stop, min(left, 1.0))
            if await self._store.position(name) != expected:
                return

    async def _report_lag(self, name: str) -> None:
        state = await self._store.state(name)
        if state is None:
            return
        oldest = (
            max((datetime.now(UTC) - state.oldest_undelivered_at).total_seconds(), 0.0)
            if state.oldest_undelivered_at is not None
            else 0.0
        )
        self._metrics.lag(subscriber=name, events=state.behind, oldest_seconds=oldest)


def dispatcher_from_settings(
    settings: Settings, pool: asyncpg.Pool, *, metrics: DispatchMetrics = NO_DISPATCH_METRICS
) -> Dispatcher:
    """The dispatcher of the configured subscribers (SubscribersError when they are wrong)."""
    inline = settings.subscribers.get_secret_value() if settings.subscribers else None
    return Dispatcher(
        pool,
        load_subscribers(inline, settings.subscribers_file),
        metrics=metrics,
        poll_interval=settings.dispatch_poll_interval,
        retry_initial=settings.dispatch_retry_initial,
        retry_max=settings.dispatch_retry_max,
        timeout=settings.dispatch_timeout,
        metrics_interval=settings.dispatch_metrics_interval,
    )
