-- R19: the seller's response window is the marketplace's policy, not the buyer's request.
--
-- `seller_policies`: a seller's own window (and, optionally, timeout policy); a seller without a
-- row gets the worker's ORDERCANCEL_SELLER_RESPONSE_WINDOW / ORDERCANCEL_TIMEOUT_POLICY. The
-- floor (ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR) is configuration: `ordercancel sellers
-- policy` refuses a window below it, and the opening applies it again (a floor raised later
-- wins over an older policy).
--
-- `cancellations` records the window, the policy and the seller's deadline when the request
-- path opens (operators query the deadline: `ordercancel stuck`); NULL on the instant path and
-- on cancellations opened before this migration.
CREATE TABLE seller_policies (
    seller_id       text PRIMARY KEY,
    response_window interval NOT NULL CHECK (response_window > interval '0'),
    timeout_policy  text CHECK (timeout_policy IN ('auto_approve', 'auto_reject', 'escalate')),
    updated_by      text NOT NULL DEFAULT '',
    updated_at      timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE cancellations
    ADD COLUMN response_window interval,
    ADD COLUMN timeout_policy  text,
    ADD COLUMN seller_deadline timestamptz;
CREATE INDEX cancellations_waiting ON cancellations (seller_deadline)
    WHERE status IN ('awaiting_seller', 'escalated');

-- The opening of migration 005, which now also takes the window from the policy and records the
-- deadline; 'existing' returns what was recorded, so a later run keeps the first deadline.
DROP FUNCTION ledger_open_cancellation(text, text, text, text, text, text, text, text);

CREATE FUNCTION ledger_open_cancellation(
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
    SELECT s.status, s.cash_minor, p.currency, p.method, p.capture, o.buyer_id
    INTO sub
    FROM sub_orders s
    JOIN payments p ON p.order_id = s.order_id
    JOIN checkout_orders o ON o.order_id = s.order_id
    WHERE s.order_id = p_order_id AND s.seller_id = p_seller_id
    FOR UPDATE OF s;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL, NULL::interval, NULL, NULL::timestamptz;
        RETURN;
    END IF;

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

    -- R19: the seller's window is the marketplace's policy (this seller's, else the default),
    -- never below the floor; never the buyer's.
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
    -- Both opening rows in one statement, in this order (000 first).
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
