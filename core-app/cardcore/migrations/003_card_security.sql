-- Card and identity data under versioned keys (cardcore.common.crypto): every keyed hash and
-- ciphertext starts with its 2-byte key version, and the rows say which version they are under
-- (key_version) so a rotation finds what is left to rewrap. Version 0 is what the first release
-- wrote: cards are still found and read, and rewrapped by POST /v1/admin/keys/rewrap; what SQL
-- cannot key is neutralized here: national-id hashes of before were unkeyed SHA-256 (dropped: a
-- returning applicant of before is no longer recognised), idempotency digests of before were
-- unkeyed SHA-256 of the whole request, PAN included (replaced by a 2-byte version 0, meaning
-- "body unknown": a retry with the key is answered the first response without the body check).

ALTER TABLE customers ALTER COLUMN id_number_hash DROP NOT NULL;
ALTER TABLE customers ADD COLUMN id_number_cipher bytea;
ALTER TABLE customers ADD COLUMN key_version smallint NOT NULL DEFAULT 0;
UPDATE customers SET id_number_hash = NULL WHERE octet_length(id_number_hash) = 32;
CREATE INDEX customers_key_version ON customers (key_version);

UPDATE idempotency SET request_hash = '\x0000'::bytea WHERE octet_length(request_hash) = 32;

ALTER TABLE cards ADD COLUMN key_version smallint NOT NULL DEFAULT 0;
CREATE INDEX cards_key_version ON cards (key_version);
-- the key version the card's CVV2 was derived under (printed on the card: a rotation keeps it);
-- NULL for cards issued before CVV2 existed, which cannot be used card-not-present
ALTER TABLE cards ADD COLUMN cvv_key_version smallint;
-- card-not-present: wrong CVV2 or expiry in a row, and until when online use is locked
ALTER TABLE cards ADD COLUMN cnp_failures smallint NOT NULL DEFAULT 0 CHECK (cnp_failures >= 0);
ALTER TABLE cards ADD COLUMN cnp_locked_until timestamptz;

-- PAN serials are random now (cardcore.issuing): the sequence hands out no more numbers
DROP SEQUENCE pan_serial;

CREATE OR REPLACE FUNCTION cardcore_load_batch(
    p_keys text[], p_tokens bytea[], p_auths text[], p_plans text[], p_txns text[], p_accounts text[],
    p_now timestamptz
) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
    v_accounts text[];
    v_result json;
BEGIN
    SELECT array_agg(DISTINCT a ORDER BY a) INTO v_accounts FROM (
        SELECT unnest(p_accounts) AS a
        UNION SELECT account_id FROM cards WHERE pan_token = ANY(p_tokens)
        UNION SELECT account_id FROM authorizations WHERE auth_id = ANY(p_auths)
        UNION SELECT account_id FROM installment_plans WHERE plan_id = ANY(p_plans)
    ) AS wanted WHERE a IS NOT NULL;

    -- one order for every batch of every app server: no deadlock between them
    PERFORM 1 FROM accounts WHERE account_id = ANY(v_accounts) ORDER BY account_id FOR UPDATE;

    SELECT json_build_object(
        'idem', (SELECT json_agg(json_build_array(key, encode(request_hash, 'hex'), status, convert_from(response, 'UTF8')))
                 FROM idempotency WHERE key = ANY(p_keys)),
        'cards', (SELECT json_agg(json_build_array(encode(pan_token, 'hex'), card_id, account_id, status, expiry,
                                                   cvv_key_version, cnp_failures, cnp_locked_until > p_now))
                  FROM cards WHERE pan_token = ANY(p_tokens)),
        'auths', (SELECT json_agg(json_build_array(auth_id, account_id, card_id, line, amount_fen, hold_fen, status,
                                                   expires_at <= p_now))
                  FROM authorizations WHERE auth_id = ANY(p_auths)),
        'plans', (SELECT json_agg(json_build_array(plan_id, account_id, principal_fen, terms, schedule, periods_billed, status))
                  FROM installment_plans WHERE plan_id = ANY(p_plans)),
        'txns', (SELECT json_agg(json_build_array(t.transaction_id, t.account_id, t.kind, t.amount_fen, p.plan_id, a.mcc))
                 FROM transactions t LEFT JOIN installment_plans p ON p.transaction_id = t.transaction_id
                 LEFT JOIN authorizations a ON a.auth_id = t.auth_id WHERE t.transaction_id = ANY(p_txns)),
        'accounts', (SELECT json_agg(json_build_array(
                a.account_id, a.customer_id, a.product_code, a.status, c.total_spend_fen, c.installment_plan_count,
                c.birth_date,
                (SELECT json_agg(json_build_array(l.line, l.limit_fen, l.held_fen)) FROM lines l
                  WHERE l.account_id = a.account_id),
                (SELECT json_agg(json_build_array(b.gl, b.balance_fen)) FROM balances b WHERE b.account_id = a.account_id),
                (SELECT json_agg(json_build_array(t.line, t.amount_fen)) FROM temporary_raises t
                  WHERE t.account_id = a.account_id AND t.expires_at > p_now),
                (SELECT json_agg(json_build_array(ct.tag, ct.source)) FROM customer_tags ct WHERE ct.customer_id = a.customer_id),
                (SELECT json_agg(json_build_array(h.line, h.hold_fen)) FROM authorizations h
                  WHERE h.account_id = a.account_id AND h.status = 'open' AND h.expires_at <= p_now)))
            FROM accounts a JOIN customers c USING (customer_id) WHERE a.account_id = ANY(v_accounts))
    ) INTO v_result;

    -- holds past their expiry stop counting: the caller takes them out of the lines it writes back
    UPDATE authorizations SET status = 'expired', hold_fen = 0
     WHERE account_id = ANY(v_accounts) AND status = 'open' AND expires_at <= p_now;
    RETURN v_result;
END $$;
