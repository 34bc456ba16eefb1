"""`python -m tools.bench`: the benchmark (docs/performance.md). A developer tool, run from a
checkout (`make bench`); not installed with the product and not in the image."""

from tools.bench.cli import bench_app

if __name__ == "__main__":
    bench_app(prog_name="python -m tools.bench")
