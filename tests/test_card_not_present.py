"""Card-not-present basics and card data at rest: an online authorization carries the CVV2 printed
on the card (derived with a key, never stored), repeated wrong CVV2s or expiry dates lock the card
for online use for a while, PAN serials are not sequential, and every ciphertext and keyed hash
carries its key version and is bound to its card."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from cardcore.common import crypto, ids
from cryptography.exceptions import InvalidTag

from tests.cards import authorize, database_fingerprint, lines, open_account
from tests.fixtures_core import CoreStack


def wrong(cvv2: str) -> str:
    return f"{(int(cvv2) + 1) % 1000:03d}"


def code(core: CoreStack, card: dict[str, Any], **overrides: Any) -> str:
    response = authorize(core.client, card, 1_000, **overrides)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["approved"] is (answer["response_code"] == "00"), answer
    return str(answer["response_code"])


def test_the_application_answers_the_cvv2_once_and_no_read_shows_it(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert re.fullmatch(r"\d{3}", opened["cvv2"])
    card = core.client.get(f"/v1/cards/{opened['card_id']}").json()
    customer = core.client.get(f"/v1/customers/{opened['customer_id']}").json()
    assert "cvv2" not in card and all("cvv2" not in c for c in customer["cards"])
    (row,) = core.psql(int(opened["cell"]), "SELECT * FROM cards WHERE card_id = $1", opened["card_id"])
    assert "cvv2" not in dict(row) and "cvv" not in " ".join(dict(row)).replace("cvv_key_version", "")


def test_an_online_authorization_without_a_cvv2_is_refused_and_writes_nothing(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    response = authorize(core.client, opened, 1_000, channel="online", cvv2=None)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "cvv2"
    for bad in ("12", "1234", "abc", 123):
        response = authorize(core.client, opened, 1_000, channel="online", cvv2=bad)
        assert response.status_code == 400 and response.json()["error"]["field"] == "cvv2", response.text
    assert database_fingerprint(core) == before


def test_a_wrong_cvv2_online_is_declined_n7_and_holds_nothing(core: CoreStack) -> None:
    opened = open_account(core.client)
    available = lines(core.client, opened["customer_id"])["purchase"]["available"]
    assert code(core, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    assert lines(core.client, opened["customer_id"])["purchase"]["available"] == available
    assert code(core, opened, channel="online") == "00"
    # at the point of sale the card is present: no CVV2 is asked for
    assert code(core, opened, channel="pos") == "00"


def test_repeated_wrong_cvv2_or_expiry_online_locks_the_card_for_online_use_only(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert code(core, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    assert code(core, opened, channel="online", expiry="01/20") == "54"
    assert code(core, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    # the third in a row locked it: even the right code is declined as suspected fraud
    assert code(core, opened, channel="online") == "59"
    assert code(core, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "59"
    # the card in hand still pays
    assert code(core, opened, channel="pos") == "00"


def test_a_right_cvv2_between_wrong_ones_starts_the_count_again(core: CoreStack) -> None:
    opened = open_account(core.client)
    for _ in range(2):
        assert code(core, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    assert code(core, opened, channel="online") == "00"
    for _ in range(2):
        assert code(core, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    assert code(core, opened, channel="online") == "00"


def test_the_online_lock_ends_after_its_time(core_factory: Callable[[], CoreStack]) -> None:
    stack = core_factory()
    app = stack.start_app([1, 2], cnp_failures_max=2, cnp_lock_seconds=2)
    stack.start_gateway({1: [app.url], 2: [app.url]})
    opened = open_account(stack.client)
    for _ in range(2):
        assert code(stack, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    assert code(stack, opened, channel="online") == "59"
    time.sleep(2.5)
    assert code(stack, opened, channel="online") == "00"
    # and a success cleared the count: one wrong code does not lock it again
    assert code(stack, opened, channel="online", cvv2=wrong(opened["cvv2"])) == "N7"
    assert code(stack, opened, channel="online") == "00"


def test_a_retry_of_a_wrong_cvv2_with_the_same_key_does_not_count_twice(core: CoreStack) -> None:
    opened = open_account(core.client)
    body_key = "cnp-retry-" + os.urandom(6).hex()
    for _ in range(4):  # one request, retried: one failure
        assert (
            code(core, opened, channel="online", cvv2=wrong(opened["cvv2"]), idempotency_key=body_key) == "N7"
        )
    assert code(core, opened, channel="online") == "00"


def test_pan_serials_are_not_sequential(core: CoreStack) -> None:
    serials_by_cell: dict[int, list[int]] = {}
    for _ in range(16):
        opened = open_account(core.client, activate=False)
        serials_by_cell.setdefault(int(opened["cell"]), []).append(int(opened["pan"][8:15]))
    for cell, serials in serials_by_cell.items():
        if len(serials) < 4:
            continue
        steps = [b - a for a, b in itertools.pairwise(serials)]
        assert serials != sorted(serials) and set(steps) != {1}, (cell, serials)
        assert len(set(serials)) == len(serials)


# ---- keys: versions, associated data, derivation -------------------------------------------------


def test_every_ciphertext_and_keyed_hash_carries_its_key_version() -> None:
    keys = {1: os.urandom(32), 7: os.urandom(32)}
    vault = crypto.PanVault(keys, 7)
    pan = ids.new_pan(1, 1234)
    for blob in (
        vault.token(pan),
        vault.encrypt(pan, "CD01AAAAAAAAAAAAAAAA"),
        vault.id_hash("110101199001011234"),
        vault.encrypt_id("110101199001011234", "CU01AAAAAAAAAAAAAAAA"),
        vault.request_digest(b"a request"),
    ):
        assert crypto.version_of(blob) == 7
    # lookups during a rotation: by the token of either version, the current one first
    old = crypto.PanVault(keys, 1)
    assert vault.tokens(pan)[:2] == [vault.token(pan), old.token(pan)]
    assert old.same_request(old.request_digest(b"x"), b"x") and vault.same_request(
        old.request_digest(b"x"), b"x"
    )
    assert not vault.same_request(old.request_digest(b"x"), b"y")


def test_a_ciphertext_is_bound_to_its_card() -> None:
    vault = crypto.PanVault.single(os.urandom(32))
    pan = ids.new_pan(2, 42)
    blob = vault.encrypt(pan, "CD02AAAAAAAAAAAAAAAA")
    assert vault.decrypt(blob, "CD02AAAAAAAAAAAAAAAA", 1) == pan
    with pytest.raises(InvalidTag):
        vault.decrypt(blob, "CD02BBBBBBBBBBBBBBBB", 1)  # moved to another card's row: refused
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(InvalidTag):
        vault.decrypt(tampered, "CD02AAAAAAAAAAAAAAAA", 1)


def test_keys_are_derived_with_hkdf_one_per_purpose() -> None:
    master = os.urandom(32)
    purposes = [
        crypto.PURPOSE_PAN_ENCRYPTION,
        crypto.PURPOSE_PAN_TOKEN,
        crypto.PURPOSE_ID_HASH,
        crypto.PURPOSE_ID_ENCRYPTION,
        crypto.PURPOSE_REQUEST_DIGEST,
        crypto.PURPOSE_CVV,
    ]
    derived = [crypto.derive(master, purpose) for purpose in purposes]
    assert len(set(derived)) == len(purposes)
    # not the first release's ad-hoc SHA-256 of a prefix and the key
    assert hashlib.sha256(b"mac" + master).digest() not in derived
    assert hashlib.sha256(b"enc" + master).digest() not in derived


def test_a_cvv2_stays_the_same_when_the_keys_rotate() -> None:
    first, second = os.urandom(32), os.urandom(32)
    before = crypto.PanVault({1: first}, 1)
    after = crypto.PanVault({1: first, 2: second}, 2)
    pan = ids.new_pan(1, 77)
    assert before.cvv2(pan, "11/31", 1) == after.cvv2(pan, "11/31", 1)
    assert after.cvv2_matches(pan, "11/31", 1, before.cvv2(pan, "11/31", 1))
    assert re.fullmatch(r"\d{3}", after.cvv2(pan, "11/31", 2))


def test_a_bad_key_ring_is_refused_naming_what_is_wrong() -> None:
    good = "ab" * 32
    cases = [
        ({"current": 2, "keys": {"1": good}}, "current key version 2"),
        ({"current": 1, "keys": {"1": "abc"}}, "keys.1"),
        ({"current": 1, "keys": {"x": good}}, "'x'"),
        ({"current": 1, "keys": {"1": "ab" * 16}}, "32 bytes"),
        ({"keys": {"1": good}}, "current"),
    ]
    for document, says in cases:
        with pytest.raises(crypto.KeyRingError, match=re.escape(says)):
            crypto.parse_ring(document)
