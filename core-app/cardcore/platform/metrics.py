"""A tiny Prometheus registry: counters, gauges and histograms rendered in the text format.

Owns: metric values keyed by label-value tuples and their exposition (``# HELP``/``# TYPE``,
``_bucket{le=...}``/``_sum``/``_count``). Never: depend on a client library, lock, or do more on
the hot path than a dict update (one event loop per process; the caller passes label values in
the order of ``labelnames``).

Usage::

    registry = Registry()
    requests = registry.counter("watertight_requests_total", "Requests.", ("route", "outcome"))
    requests.inc(("/v1/cards/{card_id}", "2xx"))
    body = registry.render()
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# seconds: from a fast in-memory answer (0.5 ms) to a request that waited out its timeout
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]
_LE_INF = 'le="+Inf"'


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape_label(str(value))}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "_:" for c in name) or name[0].isdigit():
        raise ValueError(f"invalid metric or label name: {name!r}")


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        _check_name(name)
        for label in labelnames:
            _check_name(label)
            if label == "le":
                raise ValueError(f"{name}: label name 'le' is reserved")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _check_labels(self, labels: Labels) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {labels!r}")

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return self.header() + self.samples()


class Counter(_Metric):
    """A monotonically increasing count. ``inc`` is one dict update."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), n: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + n

    def get(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0)

    def samples(self) -> list[str]:
        lines = []
        for labels, value in sorted(self.values.items()):
            self._check_labels(labels)
            lines.append(f"{self.name}{_label_text(self.labelnames, labels)} {_format_value(value)}")
        return lines


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def dec(self, labels: Labels = (), n: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) - n

    def remove(self, labels: Labels) -> None:
        self.values.pop(labels, None)


class Histogram(_Metric):
    """Observations counted into cumulative buckets (rendered cumulative, stored per bucket)."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = DEFAULT_BUCKETS
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError(f"{name}: at least one finite bucket is required")
        if len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: duplicate buckets")
        self.buckets = tuple(bounds)
        # labels -> [count per bucket ..., count above the last bucket, sum]
        self.values: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0] * (len(self.buckets) + 2)
        row[bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def count(self, labels: Labels = ()) -> int:
        row = self.values.get(labels)
        return int(sum(row[:-1])) if row else 0

    def samples(self) -> list[str]:
        lines = []
        names = self.labelnames
        for labels, row in sorted(self.values.items()):
            self._check_labels(labels)
            cumulative = 0.0
            for bound, count in zip(self.buckets, row, strict=False):
                cumulative += count
                le = f'le="{bound!r}"'
                lines.append(
                    f"{self.name}_bucket{_label_text(names, labels, le)} {_format_value(cumulative)}"
                )
            cumulative += row[-2]
            lines.append(
                f"{self.name}_bucket{_label_text(names, labels, _LE_INF)} {_format_value(cumulative)}"
            )
            lines.append(f"{self.name}_sum{_label_text(names, labels)} {_format_value(row[-1])}")
            lines.append(f"{self.name}_count{_label_text(names, labels)} {_format_value(cumulative)}")
        return lines


class Registry:
    """The metrics of one process, rendered together for ``GET /metrics``."""

    def __init__(self) -> None:
        self.metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help, labelnames)
        self.register(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help, labelnames)
        self.register(metric)
        return metric

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        metric = Histogram(name, help, labelnames, buckets)
        self.register(metric)
        return metric

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self.metrics.values():
            lines.extend(metric.render())
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
