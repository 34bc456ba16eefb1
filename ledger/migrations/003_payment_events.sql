-- The payment provider's webhook events, once each: providers deliver at least once, so the
-- event id is the deduplication key. Kept for reconciliation and audits.
CREATE TABLE payment_events (
    event_id         text PRIMARY KEY,
    type             text NOT NULL,
    provider_ref     text,
    refund_key       text,
    failure_code     text,
    occurred_at      timestamptz,
    received_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    cancellation_id  text REFERENCES cancellations(cancellation_id),
    -- What was done with it: delivered (to a running cancellation), reopened, unknown_refund,
    -- ignored (the cancellation has ended and the event changes nothing).
    outcome          text NOT NULL
);
CREATE INDEX payment_events_cancellation ON payment_events (cancellation_id);
