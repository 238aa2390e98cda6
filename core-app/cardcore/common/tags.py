"""Customer tags: manual ones, and rule-based ones recomputed on the events that change them.

Owns: the rule format and its evaluation over a customer's metrics. Never: read the database.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Metric = Literal["total_spend_fen", "installment_plan_count", "credit_limit_fen", "age"]
Operator = Literal[">=", ">", "<=", "<", "==", "!="]
TAG_RE = r"^[a-z][a-z0-9_]{0,62}$"


class TagCondition(msgspec.Struct, forbid_unknown_fields=True):
    metric: Metric
    op: Operator
    value: int


class TagRule(msgspec.Struct, forbid_unknown_fields=True):
    all: list[TagCondition]


_OPS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def holds(rule: TagRule, metrics: dict[str, int]) -> bool:
    return all(_OPS[c.op](metrics[c.metric], c.value) for c in rule.all)


BUILTIN_TAGS: dict[str, tuple[str, TagRule | None]] = {
    "first_installment_candidate": (
        "spends with the card and has never converted a purchase into installments",
        TagRule(
            [TagCondition("installment_plan_count", "==", 0), TagCondition("total_spend_fen", ">=", 50_000)]
        ),
    ),
    "high_spender": (
        "cleared purchases of 20,000 CNY or more",
        TagRule([TagCondition("total_spend_fen", ">=", 2_000_000)]),
    ),
    "vip": ("set by relationship managers", None),
}
