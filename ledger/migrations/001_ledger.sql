-- The cancellation ledger. Orders are loaded from the order system and only read here; the
-- cancellation service writes cancellations, refunds, coupon decisions and the audit trail.

CREATE TABLE checkout_orders (
    order_id     text PRIMARY KEY,
    buyer_id     text NOT NULL,
    currency     char(3) NOT NULL,
    -- Hash of the loaded document: loading the same order again changes nothing, loading a
    -- different document under the same id is refused.
    source_hash  text NOT NULL,
    placed_at    timestamptz NOT NULL,
    loaded_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payments (
    payment_id        text PRIMARY KEY,
    order_id          text NOT NULL UNIQUE REFERENCES checkout_orders(order_id),
    method            text NOT NULL CHECK (method IN ('card', 'wallet', 'balance', 'bank_transfer')),
    validation        text NOT NULL CHECK (validation IN ('unvalidated', 'validated')),
    capture           text NOT NULL CHECK (capture IN ('authorized', 'captured')),
    amount_minor      bigint NOT NULL CHECK (amount_minor >= 0),
    currency          char(3) NOT NULL,
    -- Money promised back by refunds that are requested, submitted or confirmed (R9): the
    -- CHECK makes refunding more than was paid impossible, whatever the code does.
    refunded_minor    bigint NOT NULL DEFAULT 0,
    CONSTRAINT refunds_within_payment CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor)
);

CREATE TABLE sub_orders (
    order_id         text NOT NULL REFERENCES checkout_orders(order_id),
    seller_id        text NOT NULL,
    status           text NOT NULL CHECK (status IN ('unvalidated', 'accepted', 'cancelled')),
    items_minor      bigint NOT NULL CHECK (items_minor >= 0),
    discount_minor   bigint NOT NULL CHECK (discount_minor >= 0),
    shipping_minor   bigint NOT NULL CHECK (shipping_minor >= 0),
    -- Cash paid for this seller's part: discounted lines + shipping. What a refund returns.
    cash_minor       bigint NOT NULL CHECK (cash_minor >= 0),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, seller_id),
    CHECK (cash_minor = items_minor - discount_minor + shipping_minor)
);

CREATE TABLE order_lines (
    order_id        text NOT NULL,
    seller_id       text NOT NULL,
    line_no         int NOT NULL,
    sku             text NOT NULL,
    quantity        int NOT NULL CHECK (quantity > 0),
    unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
    discount_minor  bigint NOT NULL CHECK (discount_minor >= 0),
    PRIMARY KEY (order_id, seller_id, line_no),
    FOREIGN KEY (order_id, seller_id) REFERENCES sub_orders(order_id, seller_id),
    CHECK (discount_minor <= quantity * unit_price_minor)
);

CREATE TABLE coupon_redemptions (
    redemption_id   text PRIMARY KEY,
    order_id        text NOT NULL REFERENCES checkout_orders(order_id),
    coupon_code     text NOT NULL,
    discount_minor  bigint NOT NULL CHECK (discount_minor > 0),
    expires_at      timestamptz NOT NULL,
    restored_at     timestamptz,
    restored_by     text
);

-- The sub-orders a redemption paid for (R11).
CREATE TABLE coupon_footprints (
    redemption_id   text NOT NULL REFERENCES coupon_redemptions(redemption_id),
    order_id        text NOT NULL,
    seller_id       text NOT NULL,
    PRIMARY KEY (redemption_id, seller_id),
    FOREIGN KEY (order_id, seller_id) REFERENCES sub_orders(order_id, seller_id)
);
CREATE INDEX coupon_footprints_sub_order ON coupon_footprints (order_id, seller_id);

CREATE TABLE cancellations (
    cancellation_id text PRIMARY KEY,
    order_id        text NOT NULL,
    seller_id       text NOT NULL,
    buyer_id        text NOT NULL,
    reason          text NOT NULL,
    fault           text NOT NULL CHECK (fault IN ('buyer', 'seller')),
    reason_text     text NOT NULL DEFAULT '',
    path            text NOT NULL CHECK (path IN ('instant', 'request')),
    status          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (order_id, seller_id) REFERENCES sub_orders(order_id, seller_id),
    -- One cancellation per sub-order.
    UNIQUE (order_id, seller_id)
);
CREATE INDEX cancellations_status ON cancellations (status);

CREATE TABLE refunds (
    idempotency_key text PRIMARY KEY,
    cancellation_id text NOT NULL REFERENCES cancellations(cancellation_id),
    -- A refund the provider declined for good (before or after confirming it) is dead at the
    -- provider under its key, so an operator's retry makes the next generation with its own.
    generation      int NOT NULL DEFAULT 1 CHECK (generation >= 1),
    payment_id      text NOT NULL REFERENCES payments(payment_id),
    kind            text NOT NULL CHECK (kind IN ('void', 'refund')),
    amount_minor    bigint NOT NULL CHECK (amount_minor >= 0),
    currency        char(3) NOT NULL,
    stage           text NOT NULL
        CHECK (stage IN ('requested', 'submitted', 'confirmed', 'failed', 'declined',
                         'reversed')),
    provider_ref    text,
    attempts        int NOT NULL DEFAULT 0,
    last_error      text,
    eta_earliest    timestamptz,
    eta_latest      timestamptz,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz,
    confirmed_at    timestamptz,
    failed_at       timestamptz,
    reversed_at     timestamptz,
    UNIQUE (cancellation_id, generation)
);
-- Exactly one live refund per cancellation (R9), whatever retries happen: only dead ones
-- (declined, reversed) may stand beside it.
CREATE UNIQUE INDEX refunds_one_live ON refunds (cancellation_id)
    WHERE stage NOT IN ('declined', 'reversed');
CREATE INDEX refunds_stage ON refunds (stage);

CREATE TABLE coupon_decisions (
    decision_id       bigserial PRIMARY KEY,
    cancellation_id   text NOT NULL REFERENCES cancellations(cancellation_id),
    redemption_id     text REFERENCES coupon_redemptions(redemption_id),
    outcome           text NOT NULL CHECK (outcome IN ('restored', 'partial_refund', 'expired', 'no_coupon')),
    reason            text NOT NULL,
    active_sub_orders text[] NOT NULL DEFAULT '{}',
    -- Siblings that finish together may both see the footprint fully refunded and both record
    -- `restored`; only the one that flipped coupon_redemptions.restored_at performed it.
    performed_restore boolean NOT NULL DEFAULT false,
    -- The refund generation it followed: a reversed refund's coupon is decided again.
    round             int NOT NULL DEFAULT 1,
    -- Set when the refund this decision followed was reversed (the decision no longer holds).
    superseded_at     timestamptz,
    decided_at        timestamptz NOT NULL DEFAULT now()
);
-- One decision per cancellation and round: a retried activity reads the first one back.
CREATE UNIQUE INDEX coupon_decisions_once
    ON coupon_decisions (cancellation_id, round);
-- A coupon is restored at most once at a time, whichever sibling sub-order gets there; only a
-- reversal (which takes it back) makes room for a later restoration.
CREATE UNIQUE INDEX coupon_restored_once
    ON coupon_decisions (redemption_id) WHERE performed_restore AND superseded_at IS NULL;

-- The append-only audit trail (R12).
CREATE TABLE cancellation_events (
    event_id        bigserial PRIMARY KEY,
    cancellation_id text NOT NULL REFERENCES cancellations(cancellation_id),
    event_key       text NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor           text NOT NULL,
    kind            text NOT NULL,
    detail          text NOT NULL DEFAULT '',
    UNIQUE (cancellation_id, event_key)
);

CREATE FUNCTION refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cancellation_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER cancellation_events_append_only
    BEFORE UPDATE OR DELETE ON cancellation_events
    FOR EACH ROW EXECUTE FUNCTION refuse_audit_change();
