-- The coupon decision of a sub-order no coupon paid for (most orders), and the completion after
-- it, in one round trip instead of seven (issue 19): BEGIN, the cancellation's lock, the round
-- and any decision already made, the redemption (none), the decision with its audit row,
-- COMMIT, then the transition. The same statements, in a function, in that order.
--
-- A sub-order a coupon paid for is not decided here: the function looks the redemption up under
-- the cancellation's lock and, finding one, writes nothing and says so ('coupon'); the caller
-- then decides as before (`Ledger.decide_coupon`, R11: the redemption locked, the footprint
-- read after that lock, the restoration once). A decision already made is returned as it is
-- ('existing'); the completion is written after it only when no coupon paid for the sub-order
-- (with a coupon the caller reads the siblings first, as before).
--
-- `result`:
--   decided    no coupon: the decision `p_outcome` / `p_reason` and its audit row were written
--              now, then the transition
--   existing   a decision of this round was made before (its columns), nothing decided again;
--              the transition was written when that decision has no redemption
--   coupon     a coupon paid for this sub-order and it is not decided yet: nothing written
--   not_found  no such cancellation: nothing written
-- `created_at`: the cancellation's creation time when the transition was written (else NULL).
CREATE FUNCTION ledger_decide_coupon(
    p_cancellation_id  text,
    p_event_key        text,
    p_outcome          text,
    p_reason           text,
    -- The transition written after the decision (NULL p_t_status: none).
    p_t_status         text,
    p_t_cancel_sub     boolean,
    p_t_event_key      text,
    p_t_actor          text,
    p_t_kind           text,
    p_t_detail         text
) RETURNS TABLE (
    result             text,
    created_at         timestamptz,
    round              int,
    outcome            text,
    reason             text,
    redemption_id      text,
    active_sub_orders  text[],
    superseded_at      timestamptz
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    me       record;
    state    record;
    created  timestamptz;
BEGIN
    -- As `Ledger.decide_coupon`: NO KEY UPDATE, so that a reversal of a sibling (which holds the
    -- redemption and writes this cancellation's `coupon_revoked` row) is not blocked by it.
    SELECT c.order_id, c.seller_id INTO me
    FROM cancellations c WHERE c.cancellation_id = p_cancellation_id
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', NULL::timestamptz, NULL::int, NULL, NULL, NULL,
            NULL::text[], NULL::timestamptz;
        RETURN;
    END IF;

    -- One decision per refund generation (after a reversal the coupon is decided again); a
    -- statement of its own after the lock: it sees a decision committed by whoever held it.
    SELECT r.decision_round, clock_timestamp() AS read_at, d.decision_id, d.outcome AS d_outcome,
        d.reason AS d_reason, d.redemption_id AS d_redemption_id,
        d.active_sub_orders AS d_active, d.superseded_at AS d_superseded
    INTO state
    FROM (
        SELECT coalesce(max(rf.generation), 1) AS decision_round
        FROM refunds rf WHERE rf.cancellation_id = p_cancellation_id
    ) r
    LEFT JOIN coupon_decisions d
        ON d.cancellation_id = p_cancellation_id AND d.round = r.decision_round;

    IF state.decision_id IS NULL THEN
        IF EXISTS (
            SELECT 1 FROM coupon_footprints f
            WHERE f.order_id = me.order_id AND f.seller_id = me.seller_id
        ) THEN
            RETURN QUERY SELECT 'coupon', NULL::timestamptz, state.decision_round, NULL, NULL,
                NULL, NULL::text[], NULL::timestamptz;
            RETURN;
        END IF;
        -- The decision and its audit row (`Ledger.decide_coupon`'s last statement).
        INSERT INTO coupon_decisions (cancellation_id, redemption_id, outcome, reason,
            active_sub_orders, performed_restore, decided_at, round)
        VALUES (p_cancellation_id, NULL, p_outcome, p_reason, '{}', false, state.read_at,
            state.decision_round);
        INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
        VALUES (p_cancellation_id, p_event_key, 'system', 'coupon_' || p_outcome, p_reason)
        ON CONFLICT (cancellation_id, event_key) DO NOTHING;
    END IF;

    IF p_t_status IS NOT NULL AND state.d_redemption_id IS NULL THEN
        -- `_TRANSITION` of ledger/repository.py, statement by statement.
        UPDATE cancellations c SET status = p_t_status, updated_at = clock_timestamp()
        WHERE c.cancellation_id = p_cancellation_id
        RETURNING c.created_at INTO created;
        IF p_t_cancel_sub THEN
            UPDATE sub_orders so SET status = 'cancelled', status_changed_at = clock_timestamp()
            WHERE so.order_id = me.order_id AND so.seller_id = me.seller_id
              AND so.status <> 'cancelled';
        END IF;
        INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
        VALUES (p_cancellation_id, p_t_event_key, p_t_actor, p_t_kind, p_t_detail)
        ON CONFLICT (cancellation_id, event_key) DO NOTHING;
    END IF;

    IF state.decision_id IS NULL THEN
        RETURN QUERY SELECT 'decided', created, state.decision_round, p_outcome, p_reason,
            NULL::text, '{}'::text[], NULL::timestamptz;
    ELSE
        RETURN QUERY SELECT 'existing', created, state.decision_round, state.d_outcome,
            state.d_reason, state.d_redemption_id, state.d_active, state.d_superseded;
    END IF;
END;
$$;
