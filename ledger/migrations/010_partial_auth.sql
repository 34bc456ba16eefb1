-- R15: cancelling one seller's share of an authorised, not captured, payment releases that share;
-- the authorisation is voided at the provider only when nothing is left to capture.
--
-- `refunded_minor` (001) is all the money promised back to the buyer, whichever way: voids and
-- releases of authorised money and refunds of captured money. `released_minor` is the part of it
-- that was released from the authorisation (refunds of kind `void`), so the amounts read:
--   authorised = amount_minor, released = released_minor,
--   refunded (of captured money) = refunded_minor - released_minor.
ALTER TABLE payments
    ADD COLUMN released_minor bigint NOT NULL DEFAULT 0;

-- Every void ever reserved was a release of its share.
UPDATE payments p SET released_minor = COALESCE((
    SELECT sum(r.amount_minor) FROM refunds r
    WHERE r.payment_id = p.payment_id AND r.kind = 'void'
      AND r.stage NOT IN ('declined', 'reversed')
), 0);

-- With refunds_within_payment (refunded_minor <= amount_minor) this keeps
-- released + refunded <= authorised. Once payments carry `captured_minor`, the pair to add is
-- `released_minor + captured_minor <= amount_minor` and
-- `refunded_minor - released_minor <= captured_minor` (docs/design.md).
ALTER TABLE payments
    ADD CONSTRAINT releases_within_refunds
    CHECK (released_minor >= 0 AND released_minor <= refunded_minor);

-- The simulator's side of an authorisation: what it holds, what was released from it, what was
-- captured. It learns a payment the first time a void or capture names it (from the order's
-- payment; a real provider knows it from checkout).
CREATE TABLE provider_sim.authorisations (
    payment_id      text PRIMARY KEY,
    amount_minor    bigint NOT NULL CHECK (amount_minor >= 0),
    currency        char(3) NOT NULL,
    released_minor  bigint NOT NULL DEFAULT 0,
    captured_minor  bigint NOT NULL DEFAULT 0,
    status          text NOT NULL DEFAULT 'authorised'
        CHECK (status IN ('authorised', 'captured', 'voided')),
    CHECK (released_minor >= 0 AND captured_minor >= 0
        AND released_minor + captured_minor <= amount_minor),
    CHECK (status <> 'voided' OR released_minor = amount_minor)
);
