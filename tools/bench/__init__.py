"""`python -m tools.bench` (`make bench`): cancellations measured against the engine's own
limit on this machine.

Two sides run in one invocation, each on its own fresh Temporal dev server and worker process:

* **limit**: `BenchLimitShape` (tools/bench/limit_workflow.py), a no-op workflow that reproduces,
  per path, the events the real `OrderCancellation` produces (same activities, timers, updates,
  search-attribute upserts, memo and patch markers, payload sizes), with activities that return
  at once and no database. The shape is read from real histories at the start of every run.
* **product**: the real cancellation mix on the real worker (`workers.worker.build_worker`), the
  PostgreSQL ledger and the provider simulator at zero latency.

Method and figures: docs/performance.md.
"""
