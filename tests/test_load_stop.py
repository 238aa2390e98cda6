"""Stopping the load generator: SIGINT (Locust writes every report), then SIGTERM, then SIGKILL,
each bounded, so a Locust that ignores SIGINT (seen under load) still leaves its summary."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from watertight.runtime.processes import stop_load_generator

PROGRAM = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def on(sig, _frame):
    out.write_text(signal.Signals(sig).name)
    sys.exit(0)
for name in sys.argv[2:]:
    signal.signal(getattr(signal, name), on)
for name in ("SIGINT", "SIGTERM"):
    if name not in sys.argv[2:]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
out.write_text("ready")
time.sleep(60)
"""


def start(tmp_path: Path, *handled: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A process that writes the name of the first of ``handled`` it gets and exits, ignoring
    the other of SIGINT and SIGTERM."""
    out = tmp_path / "got"
    process = subprocess.Popen([sys.executable, "-c", PROGRAM, str(out), *handled])
    for _ in range(200):
        if out.exists() and out.read_text() == "ready":
            break
        time.sleep(0.05)
    return process, out


@pytest.mark.parametrize(
    ("handled", "got", "escalated"),
    [
        (("SIGINT", "SIGTERM"), "SIGINT", 0),
        (("SIGTERM",), "SIGTERM", 1),  # SIGINT ignored, as Locust once in a while does
        ((), "ready", 2),  # both ignored: killed
    ],
)
def test_the_load_generator_is_stopped_by_the_gentlest_signal_it_answers(
    tmp_path: Path, handled: tuple[str, ...], got: str, escalated: int
) -> None:
    process, out = start(tmp_path, *handled)
    said = stop_load_generator(process, timeout_s=1.0)
    assert process.poll() is not None
    assert out.read_text() == got
    assert len(said) == escalated, said
    if escalated:
        assert "no exit within 1 s of SIGINT: sent SIGTERM" in said[0]
    if escalated == 2:
        assert "sent SIGKILL" in said[1]
