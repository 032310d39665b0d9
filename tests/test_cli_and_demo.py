"""The `dre-slcl` entry point and the ops demo (`make demo`)."""

import subprocess
import sys

import pytest

import dre_kernels
from dre_kernels import demo
from dre_slcl.cli import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert dre_kernels.__version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "usage: dre-slcl" in capsys.readouterr().out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference, torch" in out and "cupy: unavailable" in out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "dre_slcl", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "dre-slcl" in r.stdout


def test_demo_table_small(monkeypatch):
    small = dict(demo.DEMO_SHAPES, B=2, fresh_per_slide=5, bank_per_slide=9, K=3, D=6, bank_rows=40, loss_B=8,
                 loss_P=5, gather_rows=7, kmeans_rows=30, kmeans_k=3)
    monkeypatch.setattr(demo, "DEMO_SHAPES", small)
    monkeypatch.setattr(demo.make_inputs, "__defaults__", (small, 0))
    lines = []
    rows = demo.run_demo("cpu", repeat=1, out=lines.append)
    backends = dre_kernels.available_backends("cpu")
    assert len(rows) == 6 * len(backends)
    for op, backend, err, ms in rows:
        assert err < 1e-2, (op, backend, err)
        assert ms > 0
    assert any("max rel err" in line for line in lines)
