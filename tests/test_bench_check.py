"""bench/speed.py --check: the plain MTT/DATM implementation written out in the bench (a flat
ConvNet, a growing list of student parameters, one backward through the unroll) gives the same
matching loss and gradients as datm's recompute and unroll, in float64."""

from __future__ import annotations

import re
import sys

import pytest

from bench import speed

NUMBER = r"(\d\.\d+e[-+]\d+)"


def test_plain_implementation_gives_datms_gradients_in_float64(capsys):
    ok = speed.check(seeds=1, tol=1e-10)
    out = capsys.readouterr().out
    rows = re.findall(rf"plain vs (recompute|unroll): relative error loss {NUMBER}, images "
                      rf"{NUMBER}, labels {NUMBER}, lr {NUMBER}", out)
    assert [r[0] for r in rows] == ["recompute", "unroll"], out  # both of datm's methods
    errors = [float(v) for r in rows for v in r[1:]]
    worst = float(re.search(rf"worst {NUMBER}", out).group(1))
    assert worst == max(errors), out
    assert worst < 1e-10, out
    assert ok and "ok (tolerance 1e-10)" in out


@pytest.mark.parametrize("agrees,code", [(True, 0), (False, 1)])
def test_check_flag_exits_1_on_a_mismatch(monkeypatch, agrees, code):
    monkeypatch.setattr(speed, "check", lambda: agrees)
    monkeypatch.setattr(sys, "argv", ["bench.speed", "--check"])
    with pytest.raises(SystemExit) as exit_:
        speed.main()
    assert exit_.value.code == code
