-- R15: authorised, released, captured and refunded always add up. 009 gave payments the amount a
-- capture took (`captured_minor`), 010 the shares released from the authorisation
-- (`released_minor`, part of `refunded_minor`). Together: a capture never takes a released
-- share, and the money refunded after the capture never exceeds what was captured.
-- A payment captured at checkout before a release was recorded against it (not possible through
-- this service) would fail here; none exists because a release needs an authorised payment.
ALTER TABLE payments
    ADD CONSTRAINT amounts_add_up CHECK (
        released_minor + captured_minor <= amount_minor
        AND refunded_minor - released_minor <= captured_minor
    );
