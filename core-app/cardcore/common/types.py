"""Field types shared by the request bodies of every module (validated by msgspec)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

AMOUNT_FEN_MAX = 100_000_000_000  # 1 billion CNY: anything above is a client bug

AmountFen = Annotated[int, msgspec.Meta(gt=0, le=AMOUNT_FEN_MAX)]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
PanText = Annotated[str, msgspec.Meta(pattern=r"^\d{12,19}$")]
Expiry = Annotated[str, msgspec.Meta(pattern=r"^(0[1-9]|1[0-2])/\d{2}$")]
Cvv2 = Annotated[str, msgspec.Meta(pattern=r"^\d{3}$")]
Mcc = Annotated[str, msgspec.Meta(pattern=r"^\d{4}$")]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Line = Literal["total", "purchase", "cash", "installment"]
Terms = Annotated[int, msgspec.Meta(ge=1, le=60)]

SUPPORTED_CURRENCIES = frozenset({"CNY"})
