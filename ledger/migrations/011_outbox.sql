-- R16: the transactional outbox. Every ledger change appends its audit row (R12); a trigger on
-- the audit trail writes the outbound event of that row in the same transaction, whoever wrote
-- it (the opening function, a transition, a refund stage, a coupon decision, a message): no
-- change without its event, no event without its change. docs/events.md is the guide.
--
-- Order. `id` (a sequence) is taken when the row is inserted, not when its transaction commits:
-- a transaction that took id 5 may commit after one that took id 6, so a reader that kept
-- "everything after 6" would miss 5. Each row therefore records its transaction (`txid`), and
-- `outbox_sequence()` gives `position`s, gap-free and in (txid, id) order, only to rows whose
-- transaction is older than every transaction still running (`pg_snapshot_xmin`): no row can
-- appear later below a position already given. Subscribers and `ordercancel events` read by
-- position only.

CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    -- The stable id a subscriber deduplicates on (at-least-once delivery).
    event_id        text NOT NULL UNIQUE,
    -- Set by outbox_sequence(); NULL while the row waits for older transactions to end.
    position        bigint UNIQUE,
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type            text NOT NULL,
    cancellation_id text NOT NULL,
    order_id        text NOT NULL,
    seller_id       text NOT NULL,
    buyer_id        text NOT NULL,
    -- The audit row it reports (R12): what, who and when, in the trail.
    audit_event_id  bigint NOT NULL UNIQUE REFERENCES cancellation_events(event_id),
    data            jsonb NOT NULL,
    occurred_at     timestamptz NOT NULL
);
CREATE INDEX outbox_unsequenced ON outbox (txid, id) WHERE position IS NULL;
CREATE INDEX outbox_cancellation ON outbox (cancellation_id, position);

-- Each subscriber's position: the last event it acknowledged (2xx). Written by the dispatcher
-- only; `ordercancel events replay` moves it back.
CREATE TABLE outbox_subscribers (
    name          text PRIMARY KEY,
    position      bigint NOT NULL DEFAULT 0,
    attempts      int NOT NULL DEFAULT 0,
    last_error    text,
    failing_since timestamptz,
    delivered_at  timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The audit kinds that are events (R16); other kinds (notes, refusals, resumptions) are not.
CREATE FUNCTION outbox_type(p_kind text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_kind = 'requested' THEN 'cancellation.requested'
        WHEN p_kind IN ('approved', 'cancelled_instantly') THEN 'cancellation.approved'
        WHEN p_kind = 'rejected' THEN 'cancellation.rejected'
        WHEN p_kind = 'withdrawn' THEN 'cancellation.withdrawn'
        WHEN p_kind = 'escalated' THEN 'cancellation.escalated'
        WHEN p_kind = 'message' THEN 'cancellation.message'
        WHEN p_kind IN ('refund_requested', 'refund_submitted', 'refund_confirmed')
            THEN 'refund.stage_changed'
        WHEN p_kind IN ('refund_failed', 'refund_declined', 'refund_reversed')
            THEN 'refund.failed'
        WHEN p_kind IN ('coupon_restored', 'coupon_partial_refund', 'coupon_expired',
                        'coupon_no_coupon', 'coupon_revoked')
            THEN 'coupon.decided'
    END
$$;

CREATE FUNCTION outbox_from_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t      text := outbox_type(NEW.kind);
    c      record;
    r      record;
    d      record;
    actor  text := split_part(NEW.actor, ':', 1);
    payload jsonb;
BEGIN
    IF t IS NULL THEN
        RETURN NULL;
    END IF;
    -- An AFTER trigger runs once its statement is done: it sees what every part of the
    -- statement (data-modifying CTEs included) wrote.
    SELECT cn.*, s.cash_minor, rtrim(p.currency) AS currency
    INTO c
    FROM cancellations cn
    LEFT JOIN sub_orders s ON s.order_id = cn.order_id AND s.seller_id = cn.seller_id
    LEFT JOIN payments p ON p.order_id = cn.order_id
    WHERE cn.cancellation_id = NEW.cancellation_id;
    -- Who, without the id for the system's own actors; the audit's detail is the text the
    -- audit trail shows (a reason, an error the provider gave, a message).
    payload := jsonb_build_object(
        'status', c.status,
        'actor', NEW.actor,
        'actor_kind', actor,
        'detail', NEW.detail
    );
    IF t = 'cancellation.requested' THEN
        payload := payload || jsonb_build_object(
            'path', c.path,
            'reason', c.reason,
            'fault', c.fault,
            'reason_text', c.reason_text,
            'seller_deadline', c.seller_deadline,
            'response_window_seconds', extract(epoch FROM c.response_window)::bigint,
            'timeout_policy', c.timeout_policy,
            'amount_minor', c.cash_minor,
            'currency', c.currency);
    ELSIF t = 'cancellation.approved' THEN
        payload := payload || jsonb_build_object(
            'instant', NEW.kind = 'cancelled_instantly', 'path', c.path,
            'amount_minor', c.cash_minor, 'currency', c.currency);
    ELSIF t = 'cancellation.escalated' THEN
        payload := payload || jsonb_build_object('seller_deadline', c.seller_deadline);
    ELSIF t = 'cancellation.message' THEN
        payload := payload || jsonb_build_object('author', NEW.actor, 'text', NEW.detail);
    ELSIF t IN ('refund.stage_changed', 'refund.failed') THEN
        -- The newest generation is the one that counts (the live one, if any).
        SELECT rf.stage, rf.kind, rf.generation, rf.amount_minor, rtrim(rf.currency) AS currency,
            rf.eta_earliest, rf.eta_latest, rf.attempts, rf.last_error
        INTO r
        FROM refunds rf WHERE rf.cancellation_id = NEW.cancellation_id
        ORDER BY rf.generation DESC LIMIT 1;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        IF t = 'refund.failed' AND r.stage NOT IN ('failed', 'declined', 'reversed') THEN
            -- A late report of a failure the refund has moved past (the trail keeps it as
            -- part of the story): the refund did not fail, so no event says it did.
            RETURN NULL;
        END IF;
        IF t = 'refund.stage_changed' AND r.stage <> substr(NEW.kind, 8) THEN
            -- A late or repeated stage report the refund did not follow (R7).
            RETURN NULL;
        END IF;
        payload := payload || jsonb_build_object(
            'stage', r.stage,
            'dot', CASE r.stage WHEN 'confirmed' THEN 3 WHEN 'submitted' THEN 2 ELSE 1 END,
            'kind', r.kind,
            'generation', r.generation,
            'amount_minor', r.amount_minor,
            'currency', r.currency,
            'eta', CASE WHEN r.eta_earliest IS NULL THEN NULL ELSE jsonb_build_object(
                'earliest', r.eta_earliest, 'latest', r.eta_latest) END);
        IF t = 'refund.failed' THEN
            payload := payload || jsonb_build_object(
                'final', r.stage IN ('declined', 'reversed'),
                'attempts', r.attempts,
                'error', r.last_error);
        END IF;
    ELSIF t = 'coupon.decided' THEN
        SELECT cd.redemption_id, cr.coupon_code INTO d
        FROM coupon_decisions cd
        LEFT JOIN coupon_redemptions cr USING (redemption_id)
        WHERE cd.cancellation_id = NEW.cancellation_id
        ORDER BY cd.round DESC LIMIT 1;
        payload := payload || jsonb_build_object(
            'outcome', CASE WHEN NEW.kind = 'coupon_revoked' THEN 'revoked'
                            ELSE substr(NEW.kind, 8) END,
            'reason', NEW.detail,
            'redemption_id', d.redemption_id,
            'coupon_code', d.coupon_code);
    END IF;
    INSERT INTO outbox (event_id, type, cancellation_id, order_id, seller_id, buyer_id,
        audit_event_id, data, occurred_at)
    VALUES ('evt_' || replace(gen_random_uuid()::text, '-', ''), t, NEW.cancellation_id,
        c.order_id, c.seller_id, c.buyer_id, NEW.event_id, payload, NEW.at);
    RETURN NULL;
END $$;

CREATE TRIGGER cancellation_events_outbox
    AFTER INSERT ON cancellation_events
    FOR EACH ROW EXECUTE FUNCTION outbox_from_audit();

-- Positions for the rows no running transaction can precede any more, in (txid, id) order.
-- One caller at a time (the advisory lock; another returns 0 at once). Returns how many rows
-- got a position now.
CREATE FUNCTION outbox_sequence(p_limit int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n    int;
    last bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(x'0CA9CE16'::int) THEN
        RETURN 0;
    END IF;
    SELECT coalesce(max(position), 0) INTO last FROM outbox;
    WITH ready AS (
        SELECT id, row_number() OVER (ORDER BY txid, id) AS rn
        FROM outbox
        WHERE position IS NULL
          AND txid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY txid, id
        LIMIT p_limit
    )
    UPDATE outbox o SET position = last + ready.rn FROM ready WHERE o.id = ready.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
