-- The payment provider simulator's own records, in a schema of their own: this is "the
-- provider's side" that reconciliation and the reliability checks compare the ledger with.
-- A real provider (issue: Stripe adapter) keeps these records itself.

CREATE SCHEMA provider_sim;

CREATE TABLE provider_sim.refunds (
    provider_ref     text PRIMARY KEY,
    -- Like a real provider: the same idempotency key returns the same refund, never a second one.
    idempotency_key  text NOT NULL UNIQUE,
    payment_id       text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('void', 'refund')),
    amount_minor     bigint NOT NULL CHECK (amount_minor >= 0),
    currency         char(3) NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    failure_code     text,
    polls            int NOT NULL DEFAULT 0,
    confirm_after_polls int NOT NULL DEFAULT 0,
    fail_after_success boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Faults to inject per payment (tests, demo, chaos runs).
CREATE TABLE provider_sim.faults (
    payment_id          text PRIMARY KEY,
    -- The next N calls fail before anything is recorded (timeouts, 503s).
    transient_failures  int NOT NULL DEFAULT 0 CHECK (transient_failures >= 0),
    -- The next call records the refund, then its response is lost: the retry must find it.
    lose_response       boolean NOT NULL DEFAULT false,
    -- Every call is refused for good with this code (card closed, refund rejected).
    final_failure       text,
    confirm_after_polls int NOT NULL DEFAULT 0 CHECK (confirm_after_polls >= 0),
    fail_after_success  boolean NOT NULL DEFAULT false
);

-- Every call the provider received, for reconciliation and for the exactly-once checks.
CREATE TABLE provider_sim.calls (
    call_id          bigserial PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT clock_timestamp(),
    operation        text NOT NULL,
    idempotency_key  text,
    payment_id       text,
    outcome          text NOT NULL
);
