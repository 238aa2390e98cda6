"""The product catalogue copied into every cell: card products and their pricing defaults.

Never: hold customer data (catalogue rows are the same in every cell).
"""

from __future__ import annotations

from typing import Any

PRODUCTS: list[dict[str, Any]] = [
    {
        "product_code": "STD",
        "name": "Watertight Standard",
        "is_default": True,
        "params": {
            "apr": 0.1825,
            "cash_fee_rate": 0.01,
            "cash_fee_min_fen": 1_000,
            "installment_fee_rates": {"3": 0.0075, "6": 0.007, "12": 0.006, "24": 0.0065},
            "installment_min_fen": 50_000,
            "single_amount_limit_fen": 5_000_000,
            "cash_single_amount_limit_fen": 500_000,
            "cash_share": 0.5,
            "blocked_mccs": ["7995"],
            "limit_income_share": 0.3,
            "limit_min_fen": 200_000,
            "limit_max_fen": 10_000_000,
            "min_due_floor_fen": 10_000,
            "min_due_rate": 0.1,
            "late_fee_rate": 0.05,
            "late_fee_min_fen": 1_000,
            "grace_days": 20,
            "card_years": 5,
        },
    },
    {
        "product_code": "GOLD",
        "name": "Watertight Gold",
        "is_default": False,
        "params": {
            "apr": 0.1642,
            "cash_fee_rate": 0.008,
            "cash_fee_min_fen": 1_000,
            "installment_fee_rates": {"3": 0.007, "6": 0.0065, "12": 0.0055, "24": 0.006},
            "installment_min_fen": 50_000,
            "single_amount_limit_fen": 20_000_000,
            "cash_single_amount_limit_fen": 1_000_000,
            "cash_share": 0.5,
            "blocked_mccs": ["7995"],
            "limit_income_share": 0.5,
            "limit_min_fen": 1_000_000,
            "limit_max_fen": 50_000_000,
            "min_due_floor_fen": 10_000,
            "min_due_rate": 0.1,
            "late_fee_rate": 0.05,
            "late_fee_min_fen": 1_000,
            "grace_days": 25,
            "card_years": 5,
        },
    },
]

# A transaction-scenario campaign every cell starts with: the first installment plan of a
# customer at half the fee, offered at authorization time for purchases of 500 CNY or more.
CAMPAIGNS: list[dict[str, Any]] = [
    {
        "layer": "transaction",
        "name": "first installment at half fee",
        "price": {"item": "installment_fee_rate", "multiplier": 0.5},
        "conditions": {
            "tags_all": ["first_installment_candidate"],
            "first_installment": True,
            "min_amount_fen": 50_000,
            "kind": "purchase",
        },
    }
]

OFFER_TERMS = 12
