"""`python -m tools.chaos` (`make chaos`): cancellations of every path run against a real Temporal
dev server and a real PostgreSQL while workers are killed, PostgreSQL and Temporal are restarted
and the payment provider misbehaves; then the ledger, the provider's own records and Temporal
visibility are checked for what must never happen (a lost cancellation, a double refund, a
coupon given back twice). docs/reliability.md describes the run and its figures.

- `tools.chaos.plan`: the orders, the cancellations of each path and the provider faults (seeded).
- `tools.chaos.stack`: the embedded servers and `ordercancel worker` subprocesses, restartable.
- `tools.chaos.driver`: buyers, sellers and the provider's webhook, persistent through outages.
- `tools.chaos.hostile`: hostile input (client and `temporal` CLI) for the plan's hostile share.
- `tools.chaos.faults`: the fault loop (SIGKILL, SIGTERM drain, restarts, a second worker).
- `tools.chaos.checks`: the invariants, from the ledger, `provider_sim` and Temporal.
- `tools.chaos.run`: the whole run; `tools.chaos.report`: the table; `tools.chaos.cli`: the command.
"""

# The CI-sized run (`python -m tools.chaos` without --count): about 4-5 minutes on 2 cores, well
# inside the 10-minute budget (docs/reliability.md).
DEFAULT_COUNT = 300
