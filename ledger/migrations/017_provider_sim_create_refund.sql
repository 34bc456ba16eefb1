-- The provider simulator's refund or void of a payment without faults in one round trip
-- (issue 19). A void took ten (BEGIN, the fault's lock, the replay check, learning the
-- authorisation, its lock, the release, the refund, its read, the call's log, COMMIT); a refund
-- one already (`_CREATE_WITHOUT_FAULTS`, now this function). The same statements, in a
-- function, in that order, with one improvement: a void's replay check runs after the
-- authorisation's lock, so that a concurrent first call with the same key, which committed
-- while this one waited, is found as a replay instead of being released twice.
--
-- It also returns the provider-wide settings (`provider_sim.settings`, 007) as they are now:
-- the simulator keeps them for the next call's network (the table is read again only when no
-- call has read it for a second), so that a change made by another process still applies
-- within a second, and without a statement of its own while calls come in.
--
-- `outcome`:
--   created    the refund was recorded now (a void released its share of the authorisation)
--   replayed   this key made a refund before: it is returned
--   mismatch   this key made a refund with other parameters (logged, nothing else written)
--   refused    a void the authorisation cannot release (`refusal`: payment_not_voidable,
--              release_exceeds_authorisation; logged, nothing else written)
--   faulted    the payment has faults (`provider_sim.faults`): nothing written or logged, the
--              caller's path with faults decides
CREATE FUNCTION provider_sim.create_refund(
    p_provider_ref         text,
    p_key                  text,
    p_payment              text,
    p_kind                 text,
    p_amount               bigint,
    p_currency             text,
    p_status               text,
    p_confirm_after_polls  int
) RETURNS TABLE (
    outcome            text,
    refusal            text,
    provider_ref       text,
    idempotency_key    text,
    payment_id         text,
    kind               text,
    amount_minor       bigint,
    currency           text,
    status             text,
    failure_code       text,
    settings_found     boolean,
    s_transient_rate   double precision,
    s_latency_ms       int
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    st_found  boolean;
    st_rate   double precision;
    st_lat    int;
    held      record;
    v_refusal text;
    made      boolean;
    v_outcome text;
    rf        provider_sim.refunds%ROWTYPE;
BEGIN
    SELECT s.transient_rate, s.latency_ms INTO st_rate, st_lat FROM provider_sim.settings s;
    st_found := FOUND;

    IF EXISTS (SELECT 1 FROM provider_sim.faults f WHERE f.payment_id = p_payment) THEN
        RETURN QUERY SELECT 'faulted', NULL::text, NULL::text, NULL::text, NULL::text,
            NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text, st_found,
            st_rate, st_lat;
        RETURN;
    END IF;

    IF p_kind = 'void' THEN
        -- R15: a void releases its share of the authorisation (`_release` of
        -- payments/provider.py). The simulator learns the authorisation from the order's
        -- payment the first time a void names it.
        INSERT INTO provider_sim.authorisations (payment_id, amount_minor, currency)
        SELECT p.payment_id, p.amount_minor, p.currency FROM payments p
        WHERE p.payment_id = p_payment AND p.capture = 'authorized'
        ON CONFLICT (payment_id) DO NOTHING;
        SELECT a.status, a.amount_minor, a.released_minor INTO held
        FROM provider_sim.authorisations a WHERE a.payment_id = p_payment
        FOR UPDATE;
        -- A payment the simulator does not know: its void is taken as it comes.
        IF FOUND AND NOT EXISTS (
            SELECT 1 FROM provider_sim.refunds r WHERE r.idempotency_key = p_key
        ) THEN
            IF held.status = 'captured' THEN
                v_refusal := 'payment_not_voidable';
            ELSIF p_amount > held.amount_minor - held.released_minor THEN
                v_refusal := 'release_exceeds_authorisation';
            ELSE
                UPDATE provider_sim.authorisations a
                SET released_minor = a.released_minor + p_amount,
                    status = CASE WHEN a.released_minor + p_amount = a.amount_minor
                                  THEN 'voided' ELSE a.status END
                WHERE a.payment_id = p_payment;
            END IF;
        END IF;
        IF v_refusal IS NOT NULL THEN
            INSERT INTO provider_sim.calls (operation, idempotency_key, payment_id, outcome)
            VALUES ('create_refund', p_key, p_payment, 'refused');
            RETURN QUERY SELECT 'refused', v_refusal, NULL::text, NULL::text, NULL::text,
                NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text, st_found,
                st_rate, st_lat;
            RETURN;
        END IF;
    END IF;

    INSERT INTO provider_sim.refunds (provider_ref, idempotency_key, payment_id, kind,
        amount_minor, currency, status, confirm_after_polls, fail_after_success)
    VALUES (p_provider_ref, p_key, p_payment, p_kind, p_amount, p_currency, p_status,
        p_confirm_after_polls, false)
    ON CONFLICT (idempotency_key) DO NOTHING;
    made := FOUND;
    -- A statement of its own: it sees the refund a concurrent first call with this key
    -- committed (the insert above waited for it).
    SELECT r.* INTO rf FROM provider_sim.refunds r WHERE r.idempotency_key = p_key;
    v_outcome := CASE
        WHEN (rf.amount_minor, rtrim(rf.currency), rf.payment_id, rf.kind)
             <> (p_amount, p_currency, p_payment, p_kind) THEN 'mismatch'
        WHEN made THEN 'created'
        ELSE 'replayed'
    END;
    INSERT INTO provider_sim.calls (operation, idempotency_key, payment_id, outcome)
    VALUES ('create_refund', p_key, p_payment, v_outcome);
    RETURN QUERY SELECT v_outcome, NULL::text, rf.provider_ref, rf.idempotency_key,
        rf.payment_id, rf.kind, rf.amount_minor, rtrim(rf.currency), rf.status,
        rf.failure_code, st_found, st_rate, st_lat;
END;
$$;
