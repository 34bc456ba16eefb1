"""How `ordercancel` ends: with the command's exit code and all it printed, its `atexit` work done,
but without the interpreter's finalization, where the Temporal SDK's runtime threads can crash a
process that has already done its work (`infra/process_exit.py`). Each case is a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ORDERCANCEL = str(Path(sys.executable).with_name("ordercancel"))


def _leave_with(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A process that registers an `atexit` handler, prints without a newline and ends through
    `leave(<code>)`."""
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, sys\n"
        "from infra.process_exit import leave\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "print('the result', end='')\n"
        "print('a warning', end='', file=sys.stderr)\n"
        f"leave({code})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(("code", "status"), [("0", 0), ("None", 0), ("3", 3)])
def test_leave_keeps_the_exit_code_the_output_and_the_atexit_work(
    code: str, status: int, tmp_path: Path
) -> None:
    ended = _leave_with(code, tmp_path)
    assert ended.returncode == status, ended.stderr
    assert ended.stdout == "the result"
    assert ended.stderr == "a warning"
    assert (tmp_path / "atexit-ran").read_text() == "ran"


def test_leave_with_a_message_prints_it_and_fails(tmp_path: Path) -> None:
    ended = _leave_with("'no such order'", tmp_path)
    assert ended.returncode == 1
    assert ended.stderr == "a warningno such order\n"
    assert (tmp_path / "atexit-ran").read_text() == "ran"


def test_the_commands_exit_codes_are_kept() -> None:
    ok = subprocess.run([ORDERCANCEL, "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "Order cancellation" in ok.stdout
    bad = subprocess.run(
        [ORDERCANCEL, "no-such-command"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "No such command" in bad.stderr
