"""The load timeline: one JSON line per request the load generator finished.

``{"t": 1795970512.25, "cell": 1, "ok": true}``: ``t`` in seconds since the epoch when the answer
(or the failure) came, the cell the request was for, and whether it succeeded (an HTTP error, no
answer or an issuer-unavailable decline ``91`` is not ok). Extra keys (``kind``, ``latency_ms``,
``name``) are allowed and ignored here. The drill writes it beside the ack log; the probes and
``watertight.verdicts`` read it as ``(t, cell, ok)`` samples.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from watertight.verdicts import Sample


def sample_of(record: Mapping[str, Any]) -> Sample:
    return float(record["t"]), int(record["cell"]), bool(record["ok"])


def read_timeline(path: Path) -> list[Sample]:
    """Every sample of the file (and of its ``.worker-*`` parts when the load ran in several
    processes). A last line cut short by a crash is skipped; a missing file is an empty timeline."""
    files = [path, *sorted(path.parent.glob(path.name + ".worker-*"))] if path.parent.is_dir() else [path]
    samples: list[Sample] = []
    for file in files:
        try:
            lines = file.read_text().splitlines()
        except FileNotFoundError:
            continue
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                samples.append(sample_of(json.loads(line)))
            except (ValueError, KeyError):
                if number == len(lines) - 1:
                    continue  # the write in progress when the writer died
                raise ValueError(f"{file}:{number + 1}: not a timeline sample: {line[:80]!r}") from None
    samples.sort()
    return samples


def encode(samples: Iterable[Sample]) -> str:
    return "".join(json.dumps({"t": t, "cell": cell, "ok": ok}) + "\n" for t, cell, ok in samples)
