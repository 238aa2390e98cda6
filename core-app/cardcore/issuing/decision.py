"""Real-time account opening: an explainable rule from age and income to a credit limit.

Never: decide on anything the reasons do not name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from cardcore.common.money import decimal_of

AGE_MIN = 18
AGE_MAX = 70
INCOME_MIN_FEN = 2_400_000  # 24,000 CNY a year
LIMIT_ROUND_FEN = 100_00


@dataclass(frozen=True, slots=True)
class Decision:
    approved: bool
    reasons: list[str]
    credit_limit_fen: int


def age_on(birth_date: date, today: date) -> int:
    return today.year - birth_date.year - ((today.month, today.day) < (birth_date.month, birth_date.day))


def decide(birth_date: date, annual_income_fen: int, today: date, params: dict[str, float]) -> Decision:
    """Approve adults of working age with income above the floor; limit = share of income, capped."""
    age = age_on(birth_date, today)
    reasons: list[str] = []
    if age < AGE_MIN:
        reasons.append(f"age {age} is below {AGE_MIN}")
    if age > AGE_MAX:
        reasons.append(f"age {age} is above {AGE_MAX}")
    if annual_income_fen < INCOME_MIN_FEN:
        reasons.append(f"annual income {annual_income_fen} fen is below {INCOME_MIN_FEN} fen")
    if reasons:
        return Decision(False, reasons, 0)
    share = float(params["limit_income_share"])
    cap = int(params["limit_max_fen"])
    floor = int(params["limit_min_fen"])
    # exact, then down to whole 100 CNY (a float product can fall a hair short of a round limit)
    raw = (
        int(Decimal(annual_income_fen) * decimal_of(params["limit_income_share"]))
        // LIMIT_ROUND_FEN
        * LIMIT_ROUND_FEN
    )
    limit = max(floor, min(cap, raw))
    reasons.append(
        f"age {age} within {AGE_MIN}-{AGE_MAX}; income {annual_income_fen} fen >= {INCOME_MIN_FEN} fen; "
        f"limit = {share:.0%} of income rounded to {LIMIT_ROUND_FEN} fen, within {floor}-{cap} fen"
    )
    return Decision(True, reasons, limit)
