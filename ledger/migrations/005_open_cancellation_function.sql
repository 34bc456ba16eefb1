-- The opening of a cancellation (R1) in one round trip instead of six (BEGIN, the sub-order's
-- lock, the look-up, the two inserts, COMMIT): the same statements, in a function.
--
-- The sub-order row is locked first, so the opening and the seller's acceptance
-- (`Ledger.accept_sub_order`) serialise. The look-up of an existing cancellation is a statement
-- of its own after that lock: in READ COMMITTED every statement of a VOLATILE function takes a
-- fresh snapshot, so it sees a cancellation committed by whoever held the lock before.
--
-- `outcome` says what happened; the caller raises for everything but 'opened' and 'existing',
-- and nothing is written then:
--   opened            the cancellation, its path and its two audit rows were written now
--   existing          this cancellation was opened before (path and status as recorded)
--   not_found         no such sub-order
--   conflict          the sub-order has another cancellation (`other_cancellation_id`)
--   already_cancelled the sub-order was cancelled without a cancellation of ours
--   wrong_buyer       the order is not this buyer's
CREATE FUNCTION ledger_open_cancellation(
    p_cancellation_id  text,
    p_order_id         text,
    p_seller_id        text,
    p_buyer_id         text,
    p_reason           text,
    p_fault            text,
    p_reason_text      text,
    p_requested_detail text
) RETURNS TABLE (
    outcome               text,
    cash_minor            bigint,
    currency              text,
    method                text,
    capture               text,
    path                  text,
    status                text,
    other_cancellation_id text
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    sub     record;
    other   record;
    instant boolean;
BEGIN
    SELECT s.status, s.cash_minor, p.currency, p.method, p.capture, o.buyer_id
    INTO sub
    FROM sub_orders s
    JOIN payments p ON p.order_id = s.order_id
    JOIN checkout_orders o ON o.order_id = s.order_id
    WHERE s.order_id = p_order_id AND s.seller_id = p_seller_id
    FOR UPDATE OF s;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL;
        RETURN;
    END IF;

    SELECT c.cancellation_id, c.path, c.status
    INTO other
    FROM cancellations c
    WHERE c.order_id = p_order_id AND c.seller_id = p_seller_id;
    IF FOUND THEN
        RETURN QUERY SELECT
            CASE WHEN other.cancellation_id = p_cancellation_id THEN 'existing' ELSE 'conflict' END,
            sub.cash_minor, rtrim(sub.currency), sub.method, sub.capture,
            other.path, other.status, other.cancellation_id;
        RETURN;
    END IF;

    IF sub.status = 'cancelled' THEN
        RETURN QUERY SELECT 'already_cancelled', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL;
        RETURN;
    END IF;
    IF sub.buyer_id <> p_buyer_id THEN
        RETURN QUERY SELECT 'wrong_buyer', NULL::bigint, NULL, NULL, NULL, NULL, NULL, NULL;
        RETURN;
    END IF;

    instant := sub.status = 'unvalidated';
    IF instant THEN
        UPDATE sub_orders SET status = 'cancelled', status_changed_at = clock_timestamp()
        WHERE order_id = p_order_id AND seller_id = p_seller_id AND sub_orders.status = 'unvalidated';
    END IF;
    INSERT INTO cancellations (cancellation_id, order_id, seller_id, buyer_id, reason, fault,
        reason_text, path, status)
    VALUES (p_cancellation_id, p_order_id, p_seller_id, p_buyer_id, p_reason, p_fault,
        p_reason_text,
        CASE WHEN instant THEN 'instant' ELSE 'request' END,
        CASE WHEN instant THEN 'approved' ELSE 'awaiting_seller' END);
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
        NULL::text;
END;
$$;
