-- The simulator's "error on read" fault (issue 18): the next N status reads of a payment's
-- refunds fail like a 4xx on the read (the refund itself is untouched and may still settle).

ALTER TABLE provider_sim.faults
    ADD COLUMN read_errors int NOT NULL DEFAULT 0 CHECK (read_errors >= 0);
