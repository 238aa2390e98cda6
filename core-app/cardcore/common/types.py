"""Field types shared by the request bodies of every module (validated by msgspec)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

AMOUNT_FEN_MAX = 100_000_000_000  # 1 billion CNY: anything above is a client bug

AmountFen = Annotated[int, msgspec.Meta(gt=0, le=AMOUNT_FEN_MAX)]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
# 16 digits as the issuer gives them out; what no JSON Schema can say: the last is the Luhn check
# digit (ISO/IEC 7812), and a number whose check digit is wrong is refused (400, field pan)
PanText = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^\d{16}$",
        description="The card number: 16 digits, the last of them its Luhn check digit (ISO/IEC 7812). "
        "The pattern cannot say the check digit: a number that fails it is refused with 400.",
    ),
]
Expiry = Annotated[str, msgspec.Meta(pattern=r"^(0[1-9]|1[0-2])/\d{2}$")]
Cvv2 = Annotated[str, msgspec.Meta(pattern=r"^\d{3}$")]
Mcc = Annotated[str, msgspec.Meta(pattern=r"^\d{4}$")]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Line = Literal["total", "purchase", "cash", "installment"]
Terms = Annotated[int, msgspec.Meta(ge=1, le=60)]

SUPPORTED_CURRENCIES = frozenset({"CNY"})
