"""`python -m tools.chaos`: the reliability run (docs/reliability.md). A developer tool, run
from a checkout (`make chaos`); not installed with the product and not in the image."""

import typer

from infra.process_exit import run_then_leave
from tools.chaos.cli import chaos_command

if __name__ == "__main__":
    run_then_leave(lambda: typer.run(chaos_command))
