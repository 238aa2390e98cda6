-- One database per cell. Money in fen (bigint). Every posting belongs to one journal entry whose
-- debits equal its credits; balances are kept per (account, gl) and checked against postings.

CREATE TABLE products (
    product_code text PRIMARY KEY,
    name text NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    params jsonb NOT NULL
);

CREATE TABLE customers (
    customer_id text PRIMARY KEY,
    name text NOT NULL,
    id_number_hash bytea NOT NULL UNIQUE,
    mobile text NOT NULL,
    birth_date date NOT NULL,
    annual_income_fen bigint NOT NULL,
    total_spend_fen bigint NOT NULL DEFAULT 0,
    installment_plan_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    account_id text PRIMARY KEY,
    customer_id text NOT NULL REFERENCES customers,
    product_code text NOT NULL REFERENCES products,
    cycle_day smallint NOT NULL CHECK (cycle_day BETWEEN 1 AND 28),
    status text NOT NULL DEFAULT 'open',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_customer ON accounts (customer_id);
CREATE INDEX accounts_cycle_day ON accounts (cycle_day);

CREATE SEQUENCE pan_serial START 1 MAXVALUE 9999999;

CREATE TABLE cards (
    card_id text PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts,
    customer_id text NOT NULL REFERENCES customers,
    pan_token bytea NOT NULL UNIQUE,
    pan_cipher bytea NOT NULL,
    pan_masked text NOT NULL,
    expiry text NOT NULL,
    status text NOT NULL,
    replaced_by text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cards_customer ON cards (customer_id);

-- Credit lines: limit and held per line; posted amounts derive from balances.
CREATE TABLE lines (
    account_id text NOT NULL REFERENCES accounts,
    line text NOT NULL CHECK (line IN ('total', 'purchase', 'cash', 'installment')),
    limit_fen bigint NOT NULL CHECK (limit_fen >= 0),
    held_fen bigint NOT NULL DEFAULT 0 CHECK (held_fen >= 0),
    PRIMARY KEY (account_id, line)
);

CREATE TABLE temporary_raises (
    raise_id bigserial PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts,
    line text NOT NULL,
    amount_fen bigint NOT NULL CHECK (amount_fen > 0),
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX temporary_raises_account ON temporary_raises (account_id);

-- Every authorization decision; approved ones carry a hold until cleared, reversed or expired.
CREATE TABLE authorizations (
    auth_id text PRIMARY KEY,
    account_id text,
    card_id text,
    line text,
    amount_fen bigint NOT NULL,
    hold_fen bigint NOT NULL DEFAULT 0 CHECK (hold_fen >= 0),
    status text NOT NULL,  -- open | cleared | reversed | expired | declined
    response_code text NOT NULL,
    mcc text NOT NULL,
    merchant_id text NOT NULL,
    channel text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX authorizations_open ON authorizations (account_id) WHERE status = 'open';
CREATE INDEX authorizations_expiry ON authorizations (expires_at) WHERE status = 'open';

CREATE SEQUENCE journal_entry_id;

CREATE TABLE journal_entries (
    entry_id bigint PRIMARY KEY,
    account_id text NOT NULL,
    kind text NOT NULL,
    transaction_id text,
    business_date date,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE postings (
    entry_id bigint NOT NULL REFERENCES journal_entries,
    seq smallint NOT NULL,
    account_id text NOT NULL,  -- '' for the bank's own ledgers
    gl text NOT NULL,
    debit_fen bigint NOT NULL CHECK (debit_fen >= 0),
    credit_fen bigint NOT NULL CHECK (credit_fen >= 0),
    PRIMARY KEY (entry_id, seq)
);
CREATE INDEX postings_account ON postings (account_id, gl);

-- debit minus credit per (account, gl); '' is the bank.
CREATE TABLE balances (
    account_id text NOT NULL,
    gl text NOT NULL,
    balance_fen bigint NOT NULL,
    PRIMARY KEY (account_id, gl)
);

CREATE TABLE transactions (
    transaction_id text PRIMARY KEY,
    account_id text NOT NULL,
    kind text NOT NULL,
    amount_fen bigint NOT NULL,
    auth_id text,
    plan_id text,
    entry_id bigint,
    details jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transactions_account ON transactions (account_id, created_at DESC, transaction_id DESC);

CREATE TABLE idempotency (
    key text PRIMARY KEY,
    request_hash bytea NOT NULL,
    status smallint NOT NULL,
    response bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE installment_plans (
    plan_id text PRIMARY KEY,
    account_id text NOT NULL,
    transaction_id text NOT NULL UNIQUE,
    principal_fen bigint NOT NULL,
    terms smallint NOT NULL,
    fee_rate numeric NOT NULL,
    apr numeric NOT NULL,
    schedule jsonb NOT NULL,
    periods_billed smallint NOT NULL DEFAULT 0,
    status text NOT NULL,  -- active | paid_off | completed
    pricing_trace jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX installment_plans_account ON installment_plans (account_id);

CREATE TABLE statements (
    statement_id text PRIMARY KEY,
    account_id text NOT NULL,
    statement_date date NOT NULL,
    due_date date NOT NULL,
    statement_balance_fen bigint NOT NULL,
    minimum_due_fen bigint NOT NULL,
    interest_fen bigint NOT NULL,
    fees_fen bigint NOT NULL,
    installment_due_fen bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, statement_date)
);

CREATE TABLE cycle_runs (
    business_date date PRIMARY KEY,
    accounts integer NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tag_definitions (
    tag text PRIMARY KEY,
    description text NOT NULL,
    rule jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE customer_tags (
    customer_id text NOT NULL REFERENCES customers,
    tag text NOT NULL REFERENCES tag_definitions,
    source text NOT NULL CHECK (source IN ('manual', 'rule')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, tag)
);
CREATE INDEX customer_tags_tag ON customer_tags (tag);

CREATE TABLE pricing_rules (
    rule_id text PRIMARY KEY,
    layer text NOT NULL CHECK (layer IN ('product', 'account', 'transaction')),
    body jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
