-- Money a card issuer's finance team signs off, and what a failover leaves behind (issue 15):
-- child credit lines as shares of the total, value dates and a business date, statements that
-- carry what is due (past due, conversions into installments), statement lines, refunds,
-- incremental authorizations, reversals by the original request's key. App servers of the
-- previous release keep working while this one rolls out: nothing they write is refused (new
-- columns have defaults) and their batch functions stay; this release calls the *_v3 ones, which return the cards as
-- 003_card_security's cardcore_load_batch does (CVV2 key version, card-not-present failures, lock).

-- ---- credit lines: a child line is a share of the total ---------------------------------------
-- limit_fen of a child is kept equal to share x the total's limit (half up), so a raise of the
-- total raises every child; the share also gives each child its part of the total's temporary
-- raises. NULL on the total (and on rows written by the previous release: derived from the limits).
ALTER TABLE lines ADD COLUMN share numeric CHECK (share IS NULL OR (share >= 0 AND share <= 1));
UPDATE lines c SET share = CASE WHEN t.limit_fen > 0 THEN least(1, c.limit_fen::numeric / t.limit_fen) ELSE 1 END
  FROM lines t WHERE c.line <> 'total' AND t.account_id = c.account_id AND t.line = 'total';

-- ---- the business date and value dates -------------------------------------------------------
-- The cell's business date: the latest date a statement cycle was started for (the end of day
-- moves it), or the wall-clock date when that is later. A posting's value date is the business
-- date, or the day after the account's last statement if that is later.
CREATE TABLE business_clock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    business_date date NOT NULL
);

ALTER TABLE journal_entries ADD COLUMN value_date date;
UPDATE journal_entries SET value_date = coalesce(business_date, (created_at AT TIME ZONE 'UTC')::date);
ALTER TABLE journal_entries ALTER COLUMN value_date SET DEFAULT (now() AT TIME ZONE 'UTC')::date,
                            ALTER COLUMN value_date SET NOT NULL;

ALTER TABLE transactions ADD COLUMN value_date date,
                         ADD COLUMN statement_id text,
                         ADD COLUMN original_transaction_id text;
UPDATE transactions SET value_date = (created_at AT TIME ZONE 'UTC')::date;
ALTER TABLE transactions ALTER COLUMN value_date SET DEFAULT (now() AT TIME ZONE 'UTC')::date,
                         ALTER COLUMN value_date SET NOT NULL;
-- the lines of a statement: every transaction valued on or before it, not on an earlier one
UPDATE transactions t SET statement_id = (
    SELECT s.statement_id FROM statements s WHERE s.account_id = t.account_id AND s.statement_date >= t.value_date
     ORDER BY s.statement_date LIMIT 1);
CREATE INDEX transactions_statement ON transactions (statement_id) WHERE statement_id IS NOT NULL;
CREATE INDEX transactions_unbilled ON transactions (account_id) WHERE statement_id IS NULL;
CREATE INDEX transactions_original ON transactions (original_transaction_id) WHERE original_transaction_id IS NOT NULL;

-- ---- statements: what is due, and why ---------------------------------------------------------
-- minimum due = min(balance - converted, max(floor, fixed + rate x (revolving - converted))):
-- fixed (fees, interest and installments of the cycle, past due) is due in full, the revolving
-- rest at the rate; converted is billed principal turned into installments after the statement.
-- minimum_due_fen is kept equal to that minimum as conversions come in.
ALTER TABLE statements ADD COLUMN past_due_fen bigint NOT NULL DEFAULT 0,
                       ADD COLUMN late_fee_fen bigint NOT NULL DEFAULT 0,
                       ADD COLUMN fixed_due_fen bigint NOT NULL DEFAULT 0,
                       ADD COLUMN revolving_fen bigint NOT NULL DEFAULT 0,
                       ADD COLUMN converted_fen bigint NOT NULL DEFAULT 0,
                       ADD COLUMN min_due_rate numeric NOT NULL DEFAULT 0.1,
                       ADD COLUMN min_due_floor_fen bigint NOT NULL DEFAULT 10000,
                       ADD COLUMN minimum_due_cut_fen bigint;
UPDATE statements SET fixed_due_fen = least(statement_balance_fen, interest_fen + installment_due_fen),
                      revolving_fen = greatest(0, statement_balance_fen - interest_fen - installment_due_fen),
                      minimum_due_cut_fen = minimum_due_fen;

-- ---- product parameters this release reads ----------------------------------------------------
UPDATE products SET params = params || '{"late_fee_rate": 0.05, "late_fee_min_fen": 1000}'::jsonb
 WHERE NOT params ? 'late_fee_rate';

-- ---- holds that expire give their credit back on the lines, in the same statement -------------
CREATE FUNCTION cardcore_expire_holds(p_accounts text[], p_now timestamptz) RETURNS void LANGUAGE sql AS $$
    WITH stale AS (
        SELECT auth_id, account_id, line, hold_fen FROM authorizations
         WHERE account_id = ANY(p_accounts) AND status = 'open' AND expires_at <= p_now
    ), expired AS (
        UPDATE authorizations a SET status = 'expired', hold_fen = 0 FROM stale s
         WHERE a.auth_id = s.auth_id AND a.status = 'open'
        RETURNING s.account_id, s.line, s.hold_fen
    )
    UPDATE lines l SET held_fen = l.held_fen - e.total
      FROM (SELECT account_id, line, sum(hold_fen) AS total FROM expired GROUP BY 1, 2) e
     WHERE l.account_id = e.account_id AND l.line = e.line;
$$;

-- ---- one account's state as a JSON array (the batch load and every other reader) --------------
-- [account_id, customer_id, product_code, status, total_spend, plans, birth_date,
--  lines [[line, limit, held, share]], balances [[gl, balance]], live raises [[line, amount]],
--  tags [[tag, source]], stale open holds [[line, hold]],
--  last statement [id, date, due date, balance, minimum, converted, fixed, revolving, rate, floor] | null]
CREATE FUNCTION cardcore_account_rows(p_accounts text[], p_now timestamptz) RETURNS json LANGUAGE sql STABLE AS $$
    SELECT json_agg(json_build_array(
        a.account_id, a.customer_id, a.product_code, a.status, c.total_spend_fen, c.installment_plan_count,
        c.birth_date,
        (SELECT json_agg(json_build_array(l.line, l.limit_fen, l.held_fen, l.share::text)) FROM lines l
          WHERE l.account_id = a.account_id),
        (SELECT json_agg(json_build_array(b.gl, b.balance_fen)) FROM balances b WHERE b.account_id = a.account_id),
        (SELECT json_agg(json_build_array(t.line, t.amount_fen)) FROM temporary_raises t
          WHERE t.account_id = a.account_id AND t.expires_at > p_now),
        (SELECT json_agg(json_build_array(ct.tag, ct.source)) FROM customer_tags ct WHERE ct.customer_id = a.customer_id),
        (SELECT json_agg(json_build_array(h.line, h.hold_fen)) FROM authorizations h
          WHERE h.account_id = a.account_id AND h.status = 'open' AND h.expires_at <= p_now),
        (SELECT json_build_array(s.statement_id, s.statement_date, s.due_date, s.statement_balance_fen, s.minimum_due_fen,
                                 s.converted_fen, s.fixed_due_fen, s.revolving_fen, s.min_due_rate::text, s.min_due_floor_fen)
           FROM statements s WHERE s.account_id = a.account_id ORDER BY s.statement_date DESC LIMIT 1)))
      FROM accounts a JOIN customers c USING (customer_id) WHERE a.account_id = ANY(p_accounts);
$$;

-- ---- the group commit, release 3: one load, one apply ------------------------------------------
-- p_original_keys: idempotency keys a reversal names. Their records are read once, first, and
-- come back as 'originals' (a record committed after that read is not seen: the reversal then
-- claims the key, its insert meets the committed one on the primary key and the batch runs
-- again); the authorizations they answered are loaded and locked with the rest.
CREATE FUNCTION cardcore_load_batch_v3(
    p_keys text[], p_tokens bytea[], p_auths text[], p_plans text[], p_txns text[], p_accounts text[],
    p_original_keys text[], p_now timestamptz
) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
    v_originals json;
    v_original_auths text[];
    v_auths text[];
    v_accounts text[];
    v_result json;
BEGIN
    SELECT json_agg(json_build_array(key, encode(request_hash, 'hex'), status, convert_from(response, 'UTF8'))),
           array_agg(convert_from(response, 'UTF8')::json->>'auth_id')
      INTO v_originals, v_original_auths
      FROM idempotency WHERE key = ANY(p_original_keys);
    SELECT array_agg(DISTINCT x) INTO v_auths FROM (
        SELECT unnest(p_auths) AS x UNION SELECT unnest(v_original_auths)
    ) AS wanted WHERE x IS NOT NULL;

    SELECT array_agg(DISTINCT a ORDER BY a) INTO v_accounts FROM (
        SELECT unnest(p_accounts) AS a
        UNION SELECT account_id FROM cards WHERE pan_token = ANY(p_tokens)
        UNION SELECT account_id FROM authorizations WHERE auth_id = ANY(v_auths)
        UNION SELECT account_id FROM installment_plans WHERE plan_id = ANY(p_plans)
        UNION SELECT account_id FROM transactions WHERE transaction_id = ANY(p_txns)
    ) AS wanted WHERE a IS NOT NULL;

    -- one order for every batch of every app server: no deadlock between them
    PERFORM 1 FROM accounts WHERE account_id = ANY(v_accounts) ORDER BY account_id FOR UPDATE;

    SELECT json_build_object(
        'idem', (SELECT json_agg(json_build_array(key, encode(request_hash, 'hex'), status, convert_from(response, 'UTF8')))
                 FROM idempotency WHERE key = ANY(p_keys)),
        'originals', v_originals,
        'cards', (SELECT json_agg(json_build_array(encode(pan_token, 'hex'), card_id, account_id, status, expiry,
                                                   cvv_key_version, cnp_failures, cnp_locked_until > p_now))
                  FROM cards WHERE pan_token = ANY(p_tokens)),
        'auths', (SELECT json_agg(json_build_array(h.auth_id, h.account_id, h.card_id, h.line, h.amount_fen, h.hold_fen,
                                                   h.status, h.expires_at <= p_now, c.status))
                  FROM authorizations h LEFT JOIN cards c ON c.card_id = h.card_id WHERE h.auth_id = ANY(v_auths)),
        'plans', (SELECT json_agg(json_build_array(plan_id, account_id, principal_fen, terms, schedule, periods_billed, status))
                  FROM installment_plans WHERE plan_id = ANY(p_plans)),
        'txns', (SELECT json_agg(json_build_array(t.transaction_id, t.account_id, t.kind, t.amount_fen, p.plan_id, a.mcc,
                                                  t.value_date,
                                                  (SELECT coalesce(sum(r.amount_fen), 0) FROM transactions r
                                                    WHERE r.original_transaction_id = t.transaction_id AND r.kind = 'refund')))
                 FROM transactions t LEFT JOIN installment_plans p ON p.transaction_id = t.transaction_id
                 LEFT JOIN authorizations a ON a.auth_id = t.auth_id WHERE t.transaction_id = ANY(p_txns)),
        'accounts', cardcore_account_rows(v_accounts, p_now),
        'clock', (SELECT business_date FROM business_clock)
    ) INTO v_result;

    -- holds past their expiry stop counting, on the lines too (the state above still has them:
    -- the caller takes them out of what it read)
    PERFORM cardcore_expire_holds(v_accounts, p_now);
    RETURN v_result;
END $$;

CREATE FUNCTION cardcore_apply_batch_v3(p_doc json) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
BEGIN
    IF json_array_length(p_doc->'entries') > 0 THEN
        SELECT array_agg(nextval('journal_entry_id')) INTO v_ids
          FROM generate_series(1, json_array_length(p_doc->'entries'));
        INSERT INTO journal_entries (entry_id, account_id, kind, transaction_id, business_date, value_date)
        SELECT v_ids[o], e->>0, e->>1, e->>2, (e->>3)::date, (e->>4)::date
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
    -- [auth_id, hold, status, amount (null: unchanged), expires_at (null: unchanged)]
    UPDATE authorizations t SET hold_fen = (u->>1)::bigint, status = u->>2,
                                amount_fen = coalesce((u->>3)::bigint, t.amount_fen),
                                expires_at = coalesce((u->>4)::timestamptz, t.expires_at)
      FROM json_array_elements(p_doc->'auth_updates') AS x(u) WHERE t.auth_id = u->>0;
    INSERT INTO transactions (transaction_id, account_id, kind, amount_fen, auth_id, plan_id, entry_id, details,
                              value_date, original_transaction_id)
    SELECT t->>0, t->>1, t->>2, (t->>3)::bigint, t->>4, t->>5, v_ids[(t->>6)::int], (t->>7)::jsonb,
           (t->>8)::date, t->>9
      FROM json_array_elements(p_doc->'transactions') AS x(t);
    INSERT INTO installment_plans (plan_id, account_id, transaction_id, principal_fen, terms, fee_rate, apr, schedule,
                                   status, pricing_trace)
    SELECT p->>0, p->>1, p->>2, (p->>3)::bigint, (p->>4)::smallint, (p->>5)::numeric, (p->>6)::numeric,
           (p->>7)::jsonb, p->>8, (p->>9)::jsonb
      FROM json_array_elements(p_doc->'plan_inserts') AS x(p);
    UPDATE installment_plans t SET periods_billed = (u->>1)::smallint, status = u->>2
      FROM json_array_elements(p_doc->'plan_updates') AS x(u) WHERE t.plan_id = u->>0;
    -- [statement_id, converted, minimum due]
    UPDATE statements t SET converted_fen = (u->>1)::bigint, minimum_due_fen = (u->>2)::bigint
      FROM json_array_elements(p_doc->'statement_updates') AS x(u) WHERE t.statement_id = u->>0;
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
