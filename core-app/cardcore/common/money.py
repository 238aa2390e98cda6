"""The one rounding rule for money: every fee, interest and share computed from a rate is exact
in ``Decimal`` and rounded once, half up, to whole fen (1,002.5 fen is 1,003; Python's
``round()`` on a float would give 1,002, half to even, after binary error besides).

Owns: ``fen`` (round an exact amount), ``fen_of`` (a rate of an amount), ``decimal_of`` (a rate
as the decimal it was written as). Never: compute a money amount in binary floating point.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

_ONE = Decimal(1)


def decimal_of(rate: float | int | str | Decimal) -> Decimal:
    """A rate as the decimal it was written as (0.1825, not 0.18249999999999999...)."""
    return rate if isinstance(rate, Decimal) else Decimal(str(rate))


def fen(amount: Decimal) -> int:
    """An exact amount of fen rounded half up to a whole fen."""
    return int(amount.quantize(_ONE, rounding=ROUND_HALF_UP))


def fen_of(amount_fen: int, rate: float | int | str | Decimal) -> int:
    """``rate`` x ``amount_fen``, rounded half up to a whole fen."""
    return fen(Decimal(amount_fen) * decimal_of(rate))
