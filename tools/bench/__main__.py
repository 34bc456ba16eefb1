"""`python -m tools.bench`: the benchmark (docs/performance.md). A developer tool, run from a
checkout (`make bench`); not installed with the product and not in the image."""

from infra.process_exit import run_then_leave
from tools.bench.cli import bench_app

if __name__ == "__main__":
    run_then_leave(lambda: bench_app(prog_name="python -m tools.bench"))
