"""Progress bars (stages.common.progress_bar): a finished stage's bar stays printed; a bar that
an error (or Ctrl-C) ends goes, so that the one `error:` line stands alone."""

from __future__ import annotations

import io
import sys

import helpers
import pytest
from rich.console import Console

from stages import common


@pytest.fixture
def printed(monkeypatch) -> io.StringIO:
    """What common.console prints, as to a pipe (DVC, CI): the bar's last state at its end."""
    out = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=out, soft_wrap=True, width=100))
    return out


def test_a_finished_bar_stays_printed(printed):
    with common.progress_bar() as bar:
        task = bar.add_task("distill ipc 1", total=3, info="")
        bar.update(task, completed=3)
    assert "distill ipc 1" in printed.getvalue() and "3/3" in printed.getvalue()


@pytest.mark.parametrize("error", [ValueError("window too large"), KeyboardInterrupt()])
def test_a_bar_that_an_error_ends_goes(printed, error):
    with pytest.raises(type(error)):
        with common.progress_bar() as bar:
            task = bar.add_task("distill ipc 1", total=3, info="")
            bar.update(task, completed=1)
            raise error
    assert printed.getvalue() == ""


@pytest.mark.slow
def test_a_user_error_inside_a_stage_bar_is_the_one_line(tmp_path):
    """`device: cuda:7` on a machine without that GPU: distill finds out inside its bar."""
    raw = helpers.tiny_params()
    raw["device"] = "cuda:7"
    raw["launch"]["distill"] = 1  # one process: the error comes from the stage's work
    helpers.tiny_project(tmp_path, {**raw, "device": "cpu"}, experts=False)
    helpers.write_params(tmp_path, raw)
    result = helpers.run([sys.executable, "-m", "stages.distill", "--ipc", "1"], cwd=tmp_path,
                         env=helpers.stage_env(), timeout=240)
    assert result.returncode == 2, helpers.describe(result)
    lines = helpers.error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: device: cuda:7"), lines
