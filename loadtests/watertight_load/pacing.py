"""Fixed-rate (open model) pacing: the rate offered does not depend on the core's latency.

Owns: one arrival schedule per traffic class in each Locust process. Slots are laid at fixed
times ``start + k / rate``; a user that is free claims the next slot and sleeps until it. When
every user is busy (the core is slow), slots are not skipped but served late, as a burst, by
the next users to get free; a slot more than ``backlog_max_s`` late is dropped and counted,
and a warning says the offered rate is not being met (spawn more users or processes).
Never: let the backlog grow without bound; sleep forever (an idle schedule polls).

Locust stays closed-loop underneath: at most one request per user is in flight, so the users of
a class bound the concurrency. To offer R per second at latency L seconds, a process needs more
than R x L users of that class (and a Locust process tops out at a few thousand requests/s).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BACKLOG_MAX_S = 1.0
LATE_S = 0.001  # behind its time by more than this, a slot counts as late
LATE_WARN_S = 0.25
WARN_INTERVAL_S = 10.0
IDLE_POLL_S = 0.5

logger = logging.getLogger("watertight.load")


@dataclass
class Pacer:
    """The arrival schedule of one traffic class in this process."""

    name: str
    rate_tps: float = 0.0
    backlog_max_s: float = BACKLOG_MAX_S
    clock: Callable[[], float] = time.monotonic
    next_slot: float | None = None
    slots_claimed: int = 0
    slots_late: int = 0
    slots_dropped: int = 0
    lateness_max_s: float = 0.0
    _warned_at: float = field(default=-WARN_INTERVAL_S)

    def configure(self, rate_tps: float) -> None:
        """Start a new schedule at ``rate_tps`` (0: offer nothing)."""
        if rate_tps < 0:
            raise ValueError(f"{self.name}: rate must be >= 0, got {rate_tps}")
        self.rate_tps = rate_tps
        self.next_slot = None
        self.slots_claimed = self.slots_late = self.slots_dropped = 0
        self.lateness_max_s = 0.0

    def set_rate(self, rate_tps: float) -> None:
        """Change the rate without restarting the schedule (the next slot keeps its time)."""
        if rate_tps < 0:
            raise ValueError(f"{self.name}: rate must be >= 0, got {rate_tps}")
        if self.rate_tps <= 0:
            self.next_slot = None  # an idle schedule has no backlog to serve
        self.rate_tps = rate_tps

    @property
    def idle(self) -> bool:
        return self.rate_tps <= 0

    def claim(self) -> float:
        """Claim the next slot; the seconds to wait until it (0 when it is already due).

        Only for a schedule that is not idle."""
        assert self.rate_tps > 0, f"{self.name}: claim on an idle schedule"
        now = self.clock()
        interval_s = 1.0 / self.rate_tps
        slot = now if self.next_slot is None else self.next_slot
        lateness_s = now - slot
        if lateness_s > self.backlog_max_s:
            dropped = int((lateness_s - self.backlog_max_s) / interval_s) + 1
            self.slots_dropped += dropped
            slot += dropped * interval_s
            lateness_s = now - slot
        self.next_slot = slot + interval_s
        self.slots_claimed += 1
        if lateness_s > LATE_S:
            self.slots_late += 1
            self.lateness_max_s = max(self.lateness_max_s, lateness_s)
            if lateness_s > LATE_WARN_S and now - self._warned_at >= WARN_INTERVAL_S:
                self._warned_at = now
                logger.warning(
                    "%s traffic is %.2f s behind its schedule of %.1f/s in this process (%d slots "
                    "dropped so far): every user of the class is busy, so the offered rate is not "
                    "met; spawn more users (-u) or processes (--processes)",
                    self.name,
                    lateness_s,
                    self.rate_tps,
                    self.slots_dropped,
                )
        return max(0.0, -lateness_s)

    def summary(self) -> str:
        return (
            f"{self.name}: {self.rate_tps:.1f}/s scheduled in this process, {self.slots_claimed} slots "
            f"served, {self.slots_late} late (at most {self.lateness_max_s * 1000:.0f} ms), "
            f"{self.slots_dropped} dropped"
        )
