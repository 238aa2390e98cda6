-- The group commit in two round trips: one function loads (and locks) everything a batch needs,
-- one applies everything it decided. Each statement inside a PL/pgSQL function takes a new
-- snapshot (READ COMMITTED), so what is read after the lock sees every commit made before it.

CREATE FUNCTION cardcore_load_batch(
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
        'cards', (SELECT json_agg(json_build_array(encode(pan_token, 'hex'), card_id, account_id, status, expiry))
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

CREATE FUNCTION cardcore_apply_batch(p_doc json) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
BEGIN
    IF json_array_length(p_doc->'entries') > 0 THEN
        SELECT array_agg(nextval('journal_entry_id')) INTO v_ids
          FROM generate_series(1, json_array_length(p_doc->'entries'));
        INSERT INTO journal_entries (entry_id, account_id, kind, transaction_id, business_date)
        SELECT v_ids[o], e->>0, e->>1, e->>2, (e->>3)::date
          FROM json_array_elements(p_doc->'entries') WITH ORDINALITY AS x(e, o);
        INSERT INTO postings (entry_id, seq, account_id, gl, debit_fen, credit_fen)
        SELECT v_ids[(l->>0)::int], (l->>1)::smallint, l->>2, l->>3, (l->>4)::bigint, (l->>5)::bigint
          FROM json_array_elements(p_doc->'legs') AS x(l);
        INSERT INTO balances (account_id, gl, balance_fen)
        SELECT b->>0, b->>1, (b->>2)::bigint FROM json_array_elements(p_doc->'balances') AS x(b)
        ON CONFLICT (account_id, gl) DO UPDATE SET balance_fen = balances.balance_fen + EXCLUDED.balance_fen;
    END IF;
    INSERT INTO authorizations (auth_id, account_id, card_id, line, amount_fen, hold_fen, status, response_code, mcc,
                                merchant_id, channel, expires_at)
    SELECT a->>0, a->>1, a->>2, a->>3, (a->>4)::bigint, (a->>5)::bigint, a->>6, a->>7, a->>8, a->>9, a->>10,
           (a->>11)::timestamptz
      FROM json_array_elements(p_doc->'auth_inserts') AS x(a);
    UPDATE authorizations t SET hold_fen = (u->>1)::bigint, status = u->>2
      FROM json_array_elements(p_doc->'auth_updates') AS x(u) WHERE t.auth_id = u->>0;
    INSERT INTO transactions (transaction_id, account_id, kind, amount_fen, auth_id, plan_id, entry_id, details)
    SELECT t->>0, t->>1, t->>2, (t->>3)::bigint, t->>4, t->>5, v_ids[(t->>6)::int], (t->>7)::jsonb
      FROM json_array_elements(p_doc->'transactions') AS x(t);
    INSERT INTO installment_plans (plan_id, account_id, transaction_id, principal_fen, terms, fee_rate, apr, schedule,
                                   status, pricing_trace)
    SELECT p->>0, p->>1, p->>2, (p->>3)::bigint, (p->>4)::smallint, (p->>5)::numeric, (p->>6)::numeric,
           (p->>7)::jsonb, p->>8, (p->>9)::jsonb
      FROM json_array_elements(p_doc->'plan_inserts') AS x(p);
    UPDATE installment_plans t SET periods_billed = (u->>1)::smallint, status = u->>2
      FROM json_array_elements(p_doc->'plan_updates') AS x(u) WHERE t.plan_id = u->>0;
    UPDATE lines t SET held_fen = (u->>2)::bigint
      FROM json_array_elements(p_doc->'held') AS x(u) WHERE t.account_id = u->>0 AND t.line = u->>1;
    UPDATE customers t SET total_spend_fen = (u->>1)::bigint, installment_plan_count = (u->>2)::int
      FROM json_array_elements(p_doc->'customers') AS x(u) WHERE t.customer_id = u->>0;
    INSERT INTO customer_tags (customer_id, tag, source)
    SELECT u->>0, u->>1, 'rule' FROM json_array_elements(p_doc->'tags_add') AS x(u) ON CONFLICT DO NOTHING;
    DELETE FROM customer_tags t USING json_array_elements(p_doc->'tags_remove') AS x(u)
     WHERE t.customer_id = u->>0 AND t.tag = u->>1 AND t.source = 'rule';
    INSERT INTO idempotency (key, request_hash, status, response)
    SELECT i->>0, decode(i->>1, 'hex'), (i->>2)::smallint, convert_to(i->>3, 'UTF8')
      FROM json_array_elements(p_doc->'idempotency') AS x(i);
END $$;
