"""Installment arithmetic: the per-period fee model and the real APR of a schedule.

payment_k = P/n + P*f per period; integer fen, the rounding remainder in the last period.
The APR is the internal rate of return of the schedule, times 12 (the nominal annual rate the
regulator asks card issuers to disclose). Never: touch the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

IRR_ITERATIONS_MAX = 200


@dataclass(frozen=True, slots=True)
class Period:
    period: int
    principal_fen: int
    fee_fen: int

    @property
    def payment_fen(self) -> int:
        return self.principal_fen + self.fee_fen


def schedule(principal_fen: int, terms: int, fee_rate_per_period: float) -> list[Period]:
    assert principal_fen > 0 and terms > 0 and fee_rate_per_period >= 0
    total_fee = int(
        (Decimal(principal_fen) * Decimal(str(fee_rate_per_period)) * terms).quantize(
            Decimal(1), rounding=ROUND_HALF_UP
        )
    )
    principal_k, fee_k = principal_fen // terms, total_fee // terms
    periods = [Period(k, principal_k, fee_k) for k in range(1, terms)]
    periods.append(Period(terms, principal_fen - principal_k * (terms - 1), total_fee - fee_k * (terms - 1)))
    assert sum(p.principal_fen for p in periods) == principal_fen
    assert sum(p.fee_fen for p in periods) == total_fee
    return periods


def monthly_irr(principal_fen: int, payments_fen: list[int]) -> float:
    """The rate r with principal = sum(payment_k / (1+r)^k), by bisection (bounded iterations)."""
    if sum(payments_fen) <= principal_fen:
        return 0.0

    def present_value(rate: float) -> float:
        return sum(payment / (1.0 + rate) ** k for k, payment in enumerate(payments_fen, start=1))

    low, high = 0.0, 1.0
    for _ in range(IRR_ITERATIONS_MAX):
        middle = (low + high) / 2
        if present_value(middle) > principal_fen:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2


def apr(principal_fen: int, periods: list[Period]) -> float:
    return round(monthly_irr(principal_fen, [p.payment_fen for p in periods]) * 12, 6)
