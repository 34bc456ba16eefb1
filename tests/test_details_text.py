"""The current details' text helpers (workflows/visibility.py), character by character.

They run on every status change inside the workflow sandbox, so they avoid what is slow there
(`strftime` imports `time` through the sandbox's import hook on every call); these tests pin
that the fast forms write exactly what the Web UI is documented to show."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from workflows.visibility import _day, _minute, _second, escape_markdown


def reference_escape(text: str) -> str:
    """The rule, one character at a time: ASCII punctuation backslash-escaped, what cannot be
    printed (line breaks, other control characters) as a space, everything else as is."""
    out = []
    for c in text:
        if c in string.punctuation:
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(" ")
    return "".join(out)


@given(st.text())
def test_escape_markdown_follows_the_rule_for_any_text(text: str) -> None:
    assert escape_markdown(text) == reference_escape(text)


def test_escape_markdown_examples() -> None:
    assert escape_markdown("**Looking** into it") == r"\*\*Looking\*\* into it"
    assert escape_markdown("[x](http://e.vil)\nline") == r"\[x\]\(http\:\/\/e\.vil\) line"
    assert escape_markdown("déjà vu 😀") == "déjà vu 😀"


@given(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)))
def test_times_read_as_their_strftime_forms(naive: datetime) -> None:
    for at in (naive, naive.replace(tzinfo=UTC)):
        assert _minute(at) == at.strftime("%Y-%m-%d %H:%M")
        assert _second(at) == at.strftime("%Y-%m-%d %H:%M:%S")
        assert _day(at) == at.strftime("%Y-%m-%d")


def test_times_round_into_the_next_day() -> None:
    at = datetime(2026, 3, 10, 23, 59, 59, 999999, tzinfo=UTC) + timedelta(microseconds=1)
    assert (_day(at), _second(at)) == ("2026-03-11", "2026-03-11 00:00:00")
