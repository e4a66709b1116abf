"""Progress reporting: bars only on a terminal, one log line per item elsewhere, nothing when quiet."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from tgated.cli import main
from tgated.progress import on_terminal, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_logs_one_line_per_item(capsys, caplog):
    caplog.set_level(logging.INFO, logger="tgated")
    assert not on_terminal()  # pytest captures stderr
    assert list(progress(["a", "b", "c"], desc="cases", unit="case")) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records if r.name == "tgated.progress"]
    assert lines == ["cases: 1/3 case", "cases: 2/3 case", "cases: 3/3 case"]
    assert "\r" not in capsys.readouterr().err


def test_manual_updates_postfix_and_silent_inner_loops(caplog):
    caplog.set_level(logging.INFO, logger="tgated")
    bar = progress(total=4, initial=1, desc="epoch 1/2", unit="batch")
    bar.set_postfix(loss="0.5000")
    bar.update(2)
    bar.close()
    with progress(total=10, desc="slices", lines=False) as inner:
        inner.update(10)
    for _ in progress(range(3), desc="quiet", quiet=True):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "tgated.progress"]
    assert lines == ["epoch 1/2: 3/4 batch (loss=0.5000)"]


def test_a_terminal_gets_a_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert on_terminal()
    assert sum(progress(range(5), desc="bar", unit="case")) == 10
    assert "\r" in term.getvalue() and "5/5" in term.getvalue()
    term.truncate(0)
    list(progress(range(5), desc="bar", quiet=True))
    assert term.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_run_into_a_pipe_writes_no_carriage_returns(tmp_path, capsys, quiet):
    argv = ["phantom", str(tmp_path / "data"), "--cases", "2", "--size", "32"]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    if quiet:
        assert "phantoms:" not in err
    else:
        assert "phantoms: 1/2 case" in err and "phantoms: 2/2 case" in err
