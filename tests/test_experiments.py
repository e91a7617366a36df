"""Each experiment's --quick mode runs, so the committed commands cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(script: str, timeout: float, name: str = "run.py") -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", script, name), "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_detection_quick():
    out = run_quick("detection", 300)
    assert "honest run:" in out and "caught" in out


def test_sentinel_overhead_quick():
    assert "overhead" in run_quick("sentinel_overhead", 300)


def test_sentinel_overhead_scale_quick():
    out = run_quick("sentinel_overhead", 300, "scale.py")
    assert "sampled" in out and "of the stage's forward+backward" in out


@pytest.mark.slow
def test_throughput_quick():
    out = run_quick("throughput", 600)
    assert "tokens/s" in out and "raw TCP" in out


@pytest.mark.slow
def test_averaging_benchmark_quick():
    out = run_quick("averaging", 300)
    assert "plain s" in out and "robust s" in out


def test_reputation_speed_quick():
    out = run_quick("reputation_speed", 300)
    assert "identical True" in out and "identical False" not in out


def test_dataplane_benchmark_quick():
    out = run_quick("dataplane", 120)
    assert "| 16MiB | dataplane |" in out and "| 0.79MB | hivemind_p2p |" in out
