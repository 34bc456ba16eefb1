-- A refund the provider settled when it was created (a void; a refund the provider answered
-- synchronously with success): dot 2 and dot 3 recorded in one round trip instead of two
-- (issue 19), in one transaction.
--
-- The function runs the two statements `Ledger.record_refund_submitted` and
-- `Ledger.record_refund_confirmed` send (`_REFUND_SUBMITTED` and `_REFUND_CONFIRMED` of
-- ledger/repository.py), one after the other, so that everything each wrote before stays true:
-- each statement's audit row is written once per its event key, the `refund_submitted` row is
-- written while the refund and the cancellation stand at `submitted` (the outbox's trigger,
-- 011, runs at the end of each statement and sees that: `refund.stage_changed` dot 2, then
-- dot 3), `submitted_at` and `confirmed_at` are the ledger's clock at each. The confirmation
-- runs only when the submission left the refund `submitted`, as the activity did.
--
-- Returns the newest refund as it stands at the end (with its payment's method) and the stage
-- the submission left it in (`submitted_stage`); no row: the cancellation has no refund.
CREATE FUNCTION ledger_refund_submitted_and_confirmed(
    p_cancellation_id  text,
    p_provider_ref     text,
    p_eta_earliest     timestamptz,
    p_eta_latest       timestamptz,
    p_submit_key       text,
    p_submit_detail    text,
    p_confirm_key      text
) RETURNS TABLE (
    submitted_stage  text,
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
    method           text
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    after_submit text;
BEGIN
    -- `_REFUND_SUBMITTED`
    WITH upd AS (
        UPDATE refunds SET stage = 'submitted', provider_ref = p_provider_ref,
            submitted_at = clock_timestamp(), eta_earliest = p_eta_earliest,
            eta_latest = p_eta_latest, attempts = attempts + 1, last_error = NULL
        WHERE cancellation_id = p_cancellation_id AND stage IN ('requested', 'failed')
        RETURNING *
    ), unchanged AS (
        SELECT r.* FROM refunds r
        WHERE r.cancellation_id = p_cancellation_id AND NOT EXISTS (SELECT 1 FROM upd)
        FOR SHARE
    ), cur AS (
        SELECT * FROM upd
        UNION ALL
        SELECT * FROM unchanged
    ), st AS (
        UPDATE cancellations c SET status = 'refund_submitted', updated_at = clock_timestamp()
        WHERE c.cancellation_id = p_cancellation_id
          AND EXISTS (SELECT 1 FROM cur WHERE cur.stage = 'submitted')
    ), ev AS (
        INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
        SELECT p_cancellation_id, p_submit_key, 'provider', 'refund_submitted', p_submit_detail
        WHERE EXISTS (SELECT 1 FROM cur)
        ON CONFLICT (cancellation_id, event_key) DO NOTHING
    )
    SELECT cur.stage INTO after_submit FROM cur ORDER BY cur.generation DESC LIMIT 1;
    IF after_submit IS NULL THEN
        RETURN;
    END IF;

    IF after_submit = 'submitted' THEN
        -- `_REFUND_CONFIRMED`
        WITH upd AS (
            UPDATE refunds SET stage = 'confirmed', confirmed_at = clock_timestamp(),
                last_error = NULL
            WHERE cancellation_id = p_cancellation_id AND stage = 'submitted'
            RETURNING *
        ), unchanged AS (
            SELECT r.* FROM refunds r
            WHERE r.cancellation_id = p_cancellation_id AND NOT EXISTS (SELECT 1 FROM upd)
            FOR SHARE
        ), cur AS (
            SELECT * FROM upd
            UNION ALL
            SELECT * FROM unchanged
        ), st AS (
            UPDATE cancellations c SET status = 'refund_confirmed',
                updated_at = clock_timestamp()
            WHERE c.cancellation_id = p_cancellation_id
              AND EXISTS (SELECT 1 FROM cur WHERE cur.stage = 'confirmed')
        )
        INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind, detail)
        SELECT p_cancellation_id, p_confirm_key, 'provider', 'refund_confirmed',
            'the provider confirmed the refund'
        WHERE EXISTS (SELECT 1 FROM cur)
        ON CONFLICT (cancellation_id, event_key) DO NOTHING;
    END IF;

    -- A statement of its own: it sees what the two above wrote.
    RETURN QUERY
    SELECT after_submit, r.idempotency_key, r.generation, r.payment_id, r.kind, r.amount_minor,
        rtrim(r.currency), r.stage, r.provider_ref, r.attempts, r.last_error, r.eta_earliest,
        r.eta_latest, r.requested_at, r.submitted_at, r.confirmed_at, p.method
    FROM refunds r JOIN payments p ON p.payment_id = r.payment_id
    WHERE r.cancellation_id = p_cancellation_id
    ORDER BY r.generation DESC
    LIMIT 1;
END;
$$;
