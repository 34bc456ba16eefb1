-- The HTTP API's Idempotency-Key header: a key names one cancellation request of one caller.
-- Replaying the key with the same body returns the same cancellation; with another body it is
-- refused. The primary key makes concurrent first uses race safely (first insert wins).
CREATE TABLE api_idempotency_keys (
    principal        text NOT NULL,
    idempotency_key  text NOT NULL,
    -- SHA-256 of the request as validated (canonical JSON), not of the raw bytes.
    request_hash     text NOT NULL,
    cancellation_id  text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (principal, idempotency_key)
);
