-- The refund's intent (dot 1, R7-R9) in one round trip instead of five (the pool's connection,
-- BEGIN, the payment's lock, the live refund's look-up, the reservation, COMMIT), and the
-- approval that calls for it in the same round trip (issue 19): the same statements, in a
-- function, as `ledger_open_cancellation` (005) does for the opening.
--
-- With a transition (`p_status` not NULL: the seller's or the system's approval) it is written
-- first, exactly as `Ledger.record_transition` writes it (status, sub-order cancelled when
-- asked, its audit row once per event key), then the refund. The locks are taken in the order
-- the two separate transactions took them (the cancellation and its sub-order, then the
-- payment), which is also the order of the order system's events (sub-orders, then payment).
-- A refusal of the refund (limit, a repeat of a refusal) leaves the approval recorded: the
-- workflow asks `request_refund` again, which says why.
--
-- The payment row is locked before the live refund is looked up: in READ COMMITTED every
-- statement of a VOLATILE function takes a fresh snapshot, so a concurrent call for the same
-- cancellation has committed its refund by then and this look-up sees it; the amount is never
-- reserved twice. The reservation is checked by the payments table's CHECKs (a violation is
-- caught and reported, nothing of the refund is written).
--
-- `outcome` says what happened; only 'requested' wrote the refund:
--   requested       the refund (generation `generation`), its reservation, the status and the
--                   `refund_requested` audit row were written now
--   existing        the cancellation has a live refund: returned as it is, nothing written
--   declined        the newest refund was declined and the caller has not checked that the
--                   next one would not repeat the refusal (`p_declined_checked` is not its
--                   generation): returned as it is with the next refund's kind and amount
--                   (`next_kind`, `cash_minor`), nothing of a refund written
--   limit_exceeded  the payments CHECK refused the reservation (`cash_minor`, `pay_currency`,
--                   `pay_payment_id` say what), nothing of a refund written
--   not_found       no such cancellation: nothing written (the transition neither)
--
-- The refund's kind follows R2 as `domain.rules.refund_kind` does (an authorisation is
-- voided, captured money refunded); its ETA is the caller's, one per key of its ETA table
-- (`void`, or the payment method), computed from the same moment; the audit row's detail is
-- the text `Ledger.request_refund` wrote ("<kind> of <amount> requested", the amount as
-- `domain.models.Money` prints it).
CREATE FUNCTION ledger_request_refund(
    p_cancellation_id   text,
    p_event_key         text,
    p_status            text,
    p_eta_keys          text[],
    -- ISO 8601 texts (a text[] is one of the types asyncpg knows without asking the server).
    p_eta_earliest      text[],
    p_eta_latest        text[],
    p_declined_checked  int,
    -- The transition written first (NULL p_t_status: none).
    p_t_status          text,
    p_t_cancel_sub      boolean,
    p_t_event_key       text,
    p_t_actor           text,
    p_t_kind            text,
    p_t_detail          text
) RETURNS TABLE (
    outcome          text,
    created_at       timestamptz,
    idempotency_key  text,
    generation       int,
    payment_id       text,
    kind             text,
    amount_minor     bigint,
    currency         text,
    stage            text,
    provider_ref     text,
    attempts         int,
    last_error       text,
    eta_earliest     timestamptz,
    eta_latest       timestamptz,
    requested_at     timestamptz,
    submitted_at     timestamptz,
    confirmed_at     timestamptz,
    method           text,
    next_kind        text,
    cash_minor       bigint,
    pay_currency     text,
    pay_payment_id   text
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    created  timestamptz;
    sub      record;
    existing refunds%ROWTYPE;
    made     refunds%ROWTYPE;
    v_kind   text;
    v_at     int;
    v_gen    int;
BEGIN
    IF p_t_status IS NOT NULL THEN
        -- `_TRANSITION` of ledger/repository.py, statement by statement.
        UPDATE cancellations c SET status = p_t_status, updated_at = clock_timestamp()
        WHERE c.cancellation_id = p_cancellation_id
        RETURNING c.created_at INTO created;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'not_found', NULL::timestamptz, NULL, NULL::int, NULL, NULL,
                NULL::bigint, NULL, NULL, NULL, NULL::int, NULL, NULL::timestamptz,
                NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
                NULL, NULL, NULL::bigint, NULL, NULL;
            RETURN;
        END IF;
        IF p_t_cancel_sub THEN
            UPDATE sub_orders so SET status = 'cancelled', status_changed_at = clock_timestamp()
            FROM cancellations c
            WHERE c.cancellation_id = p_cancellation_id
              AND so.order_id = c.order_id AND so.seller_id = c.seller_id
              AND so.status <> 'cancelled';
        END IF;
        INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
        VALUES (p_cancellation_id, p_t_event_key, p_t_actor, p_t_kind, p_t_detail)
        ON CONFLICT (cancellation_id, event_key) DO NOTHING;
    END IF;

    SELECT s.cash_minor, p.payment_id, p.currency, p.method, p.capture
    INTO sub
    FROM cancellations c
    JOIN sub_orders s ON s.order_id = c.order_id AND s.seller_id = c.seller_id
    JOIN payments p ON p.order_id = c.order_id
    WHERE c.cancellation_id = p_cancellation_id
    FOR UPDATE OF p;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', created, NULL, NULL::int, NULL, NULL, NULL::bigint,
            NULL, NULL, NULL, NULL::int, NULL, NULL::timestamptz, NULL::timestamptz,
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL, NULL, NULL::bigint,
            NULL, NULL;
        RETURN;
    END IF;
    v_kind := CASE WHEN sub.capture = 'authorized' THEN 'void' ELSE 'refund' END;

    -- A statement of its own after the lock: it sees a refund committed by whoever held it.
    SELECT r.* INTO existing FROM refunds r
    WHERE r.cancellation_id = p_cancellation_id
    ORDER BY r.generation DESC
    LIMIT 1;
    IF existing.idempotency_key IS NOT NULL
        AND (existing.stage NOT IN ('declined', 'reversed')
             OR (existing.stage = 'declined'
                 AND existing.generation IS DISTINCT FROM p_declined_checked)) THEN
        RETURN QUERY SELECT
            CASE WHEN existing.stage = 'declined' THEN 'declined' ELSE 'existing' END,
            created, existing.idempotency_key, existing.generation, existing.payment_id,
            existing.kind, existing.amount_minor, rtrim(existing.currency), existing.stage,
            existing.provider_ref, existing.attempts, existing.last_error,
            existing.eta_earliest, existing.eta_latest, existing.requested_at,
            existing.submitted_at, existing.confirmed_at, sub.method, v_kind, sub.cash_minor,
            rtrim(sub.currency), sub.payment_id;
        RETURN;
    END IF;
    v_gen := coalesce(existing.generation, 0) + 1;

    v_at := array_position(p_eta_keys, CASE WHEN v_kind = 'void' THEN 'void' ELSE sub.method END);
    IF v_at IS NULL THEN
        RAISE EXCEPTION 'no refund ETA for %', CASE WHEN v_kind = 'void' THEN 'void'
            ELSE sub.method END;
    END IF;

    BEGIN
        UPDATE payments p SET refunded_minor = p.refunded_minor + sub.cash_minor,
            -- R15: a void reserves a released share of the authorisation.
            released_minor = p.released_minor
                + CASE WHEN v_kind = 'void' THEN sub.cash_minor ELSE 0 END
        WHERE p.payment_id = sub.payment_id;
    EXCEPTION WHEN check_violation THEN
        RETURN QUERY SELECT 'limit_exceeded', created, NULL, NULL::int, NULL, NULL,
            NULL::bigint, NULL, NULL, NULL, NULL::int, NULL, NULL::timestamptz,
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
            sub.method, v_kind, sub.cash_minor, rtrim(sub.currency), sub.payment_id;
        RETURN;
    END;

    INSERT INTO refunds (idempotency_key, cancellation_id, payment_id, kind, amount_minor,
        currency, stage, eta_earliest, eta_latest, generation)
    VALUES (
        -- `domain.rules.refund_idempotency_key`
        p_cancellation_id || ':refund-submit'
            || CASE WHEN v_gen = 1 THEN '' ELSE '-' || v_gen::text END,
        p_cancellation_id, sub.payment_id, v_kind, sub.cash_minor, sub.currency, 'requested',
        p_eta_earliest[v_at]::timestamptz, p_eta_latest[v_at]::timestamptz, v_gen)
    RETURNING * INTO made;
    UPDATE cancellations c SET status = p_status, updated_at = clock_timestamp()
    WHERE c.cancellation_id = p_cancellation_id;
    INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
    VALUES (p_cancellation_id, p_event_key, 'system', 'refund_requested',
        v_kind || ' of ' || (sub.cash_minor / 100)::text || '.'
            || lpad((sub.cash_minor % 100)::text, 2, '0') || ' ' || rtrim(sub.currency)
            || ' requested')
    ON CONFLICT (cancellation_id, event_key) DO NOTHING;

    RETURN QUERY SELECT 'requested', created, made.idempotency_key, made.generation,
        made.payment_id, made.kind, made.amount_minor, rtrim(made.currency), made.stage,
        made.provider_ref, made.attempts, made.last_error, made.eta_earliest, made.eta_latest,
        made.requested_at, made.submitted_at, made.confirmed_at, sub.method, v_kind,
        sub.cash_minor, rtrim(sub.currency), sub.payment_id;
END;
$$;
