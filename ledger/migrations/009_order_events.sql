-- R13/R14: the order system keeps the ledger live. Orders arrive by API as well as by file, and
-- what happens to them afterwards arrives as events: payment validated, payment captured (with
-- the amount), seller accepted (per sub-order), sub-order shipped.
--
-- `order_events` keeps every event once (by its id), so the state of an order can be derived
-- from its events whatever the order they arrived in; `payments` and `sub_orders` hold that state
-- for the cancellation's atomic opening to read. Cause and effect, not arrival order: captured
-- implies validated, shipped implies accepted, and a late fact already implied changes nothing.
CREATE TABLE order_events (
    event_id        text PRIMARY KEY,
    order_id        text NOT NULL REFERENCES checkout_orders(order_id),
    type            text NOT NULL CHECK (type IN ('payment_validated', 'payment_captured',
                                                  'seller_accepted', 'sub_order_shipped')),
    seller_id       text,
    amount_minor    bigint CHECK (amount_minor >= 0),
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The event as first received: a redelivery with the same hash gets the same answer, another
    -- document under the same id is refused.
    body_hash       text NOT NULL,
    -- What applying it did (ledger.order_events.EventOutcome) and in words, repeated to a
    -- redelivery.
    outcome         text NOT NULL,
    detail          text NOT NULL DEFAULT '',
    -- R14: the request waiting for its seller that the shipment ends, and when its workflow was
    -- told (NULL while it has not been: a redelivery tells it again).
    cancellation_id text,
    notified_at     timestamptz,
    FOREIGN KEY (order_id, seller_id) REFERENCES sub_orders(order_id, seller_id),
    CHECK ((type IN ('seller_accepted', 'sub_order_shipped')) = (seller_id IS NOT NULL)),
    CHECK ((type = 'payment_captured') = (amount_minor IS NOT NULL))
);
CREATE INDEX order_events_order ON order_events (order_id, occurred_at);
CREATE INDEX order_events_unnotified ON order_events (cancellation_id)
    WHERE cancellation_id IS NOT NULL AND notified_at IS NULL;

ALTER TABLE payments
    ADD COLUMN captured_minor bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT captured_within_payment
        CHECK (captured_minor >= 0 AND captured_minor <= amount_minor);
-- Orders loaded captured before this migration were captured in full.
UPDATE payments SET captured_minor = amount_minor WHERE capture = 'captured';

ALTER TABLE sub_orders
    ADD COLUMN seller_accepted_at timestamptz,
    ADD COLUMN shipped_at         timestamptz;

-- The opening of migration 008, changed in two ways:
--  * the sub-order's row is locked by a statement of its own, and what the paths are chosen on
--    (the sub-order, its payment) is read by the next statement, with a fresh snapshot: an order
--    event (ledger.order_events) locks the order's sub-orders before it changes the payment, so
--    the opening reads the capture state (R2) as it stands, not as it stood when it began to
--    wait for the lock;
--  * a shipped sub-order cannot be cancelled here (R14): outcome 'already_shipped'.
CREATE OR REPLACE FUNCTION ledger_open_cancellation(
    p_cancellation_id  text,
    p_order_id         text,
    p_seller_id        text,
    p_buyer_id         text,
    p_reason           text,
    p_fault            text,
    p_reason_text      text,
    p_requested_detail text,
    p_default_window   interval,
    p_floor            interval,
    p_default_policy   text
) RETURNS TABLE (
    outcome               text,
    cash_minor            bigint,
    currency              text,
    method                text,
    capture               text,
    path                  text,
    status                text,
    other_cancellation_id text,
    response_window       interval,
    timeout_policy        text,
    seller_deadline       timestamptz
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    sub     record;
    other   record;
    instant boolean;
    policy  record;
    win     interval;
    tpolicy text;
    deadline timestamptz;
BEGIN
    PERFORM 1 FROM sub_orders s
    WHERE s.order_id = p_order_id AND s.seller_id = p_seller_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL, NULL::interval, NULL, NULL::timestamptz;
        RETURN;
    END IF;

    SELECT s.status, s.cash_minor, s.shipped_at, p.currency, p.method, p.capture, o.buyer_id
    INTO sub
    FROM sub_orders s
    JOIN payments p ON p.order_id = s.order_id
    JOIN checkout_orders o ON o.order_id = s.order_id
    WHERE s.order_id = p_order_id AND s.seller_id = p_seller_id;

    SELECT c.cancellation_id, c.path, c.status, c.response_window, c.timeout_policy,
        c.seller_deadline
    INTO other
    FROM cancellations c
    WHERE c.order_id = p_order_id AND c.seller_id = p_seller_id;
    IF FOUND THEN
        RETURN QUERY SELECT
            CASE WHEN other.cancellation_id = p_cancellation_id THEN 'existing' ELSE 'conflict' END,
            sub.cash_minor, rtrim(sub.currency), sub.method, sub.capture,
            other.path, other.status, other.cancellation_id,
            other.response_window, other.timeout_policy, other.seller_deadline;
        RETURN;
    END IF;

    IF sub.status = 'cancelled' THEN
        RETURN QUERY SELECT 'already_cancelled', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL, NULL::interval, NULL, NULL::timestamptz;
        RETURN;
    END IF;
    IF sub.buyer_id <> p_buyer_id THEN
        RETURN QUERY SELECT 'wrong_buyer', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL, NULL::interval, NULL, NULL::timestamptz;
        RETURN;
    END IF;
    IF sub.shipped_at IS NOT NULL THEN
        RETURN QUERY SELECT 'already_shipped', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL, NULL::interval, NULL, NULL::timestamptz;
        RETURN;
    END IF;

    SELECT sp.response_window, sp.timeout_policy INTO policy
    FROM seller_policies sp WHERE sp.seller_id = p_seller_id;
    win := greatest(coalesce(policy.response_window, p_default_window), p_floor);
    tpolicy := coalesce(policy.timeout_policy, p_default_policy);

    instant := sub.status = 'unvalidated';
    IF instant THEN
        UPDATE sub_orders SET status = 'cancelled', status_changed_at = clock_timestamp()
        WHERE order_id = p_order_id AND seller_id = p_seller_id AND sub_orders.status = 'unvalidated';
    END IF;
    INSERT INTO cancellations (cancellation_id, order_id, seller_id, buyer_id, reason, fault,
        reason_text, path, status, response_window, timeout_policy, seller_deadline)
    VALUES (p_cancellation_id, p_order_id, p_seller_id, p_buyer_id, p_reason, p_fault,
        p_reason_text,
        CASE WHEN instant THEN 'instant' ELSE 'request' END,
        CASE WHEN instant THEN 'approved' ELSE 'awaiting_seller' END,
        win, tpolicy,
        CASE WHEN instant THEN NULL ELSE clock_timestamp() + win END)
    RETURNING cancellations.seller_deadline INTO deadline;
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    VALUES (p_cancellation_id, '000-requested', 'buyer:' || p_buyer_id, 'requested',
            p_requested_detail),
           (p_cancellation_id, '001-path', 'system',
            CASE WHEN instant THEN 'cancelled_instantly' ELSE 'awaiting_seller' END,
            CASE WHEN instant THEN 'payment not validated yet: cancelled without the seller'
                 ELSE 'payment validated: the seller must decide' END)
    ON CONFLICT (cancellation_id, event_key) DO NOTHING;

    RETURN QUERY SELECT 'opened', sub.cash_minor, rtrim(sub.currency), sub.method, sub.capture,
        CASE WHEN instant THEN 'instant' ELSE 'request' END,
        CASE WHEN instant THEN 'approved' ELSE 'awaiting_seller' END,
        NULL::text, win, tpolicy, deadline;
END;
$$;
