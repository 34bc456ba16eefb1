-- R17: the seller's inbox and the buyer's order view, served from the ledger.
--
-- `GET /v1/cancellations` (ledger.inbox) lists cancellations in one stable order, keyset-paged
-- (a cursor is the last row's key, never an offset, so new cancellations arriving between two
-- pages cause no duplicate and no gap among the rows that were there):
--   inbox_rank 0: requests awaiting their seller, the soonest deadline first (inbox_at is the
--                 seller's deadline);
--   inbox_rank 1: every other cancellation, oldest first (inbox_at is when it was requested);
-- ties broken by the cancellation id. The key is stored (generated columns, kept by
-- PostgreSQL on every status change) so that the indexes below serve the order per filter:
-- all (operators, the buyer service), one seller (its inbox), one buyer. An order's
-- cancellations are found by the (order_id, seller_id) key of migration 001.
ALTER TABLE cancellations
    ADD COLUMN inbox_rank smallint GENERATED ALWAYS AS (
        CASE WHEN status = 'awaiting_seller' AND seller_deadline IS NOT NULL THEN 0 ELSE 1 END
    ) STORED,
    ADD COLUMN inbox_at timestamptz GENERATED ALWAYS AS (
        CASE WHEN status = 'awaiting_seller' AND seller_deadline IS NOT NULL
             THEN seller_deadline ELSE created_at END
    ) STORED;

CREATE INDEX cancellations_inbox ON cancellations (inbox_rank, inbox_at, cancellation_id);
CREATE INDEX cancellations_inbox_seller
    ON cancellations (seller_id, inbox_rank, inbox_at, cancellation_id);
CREATE INDEX cancellations_inbox_buyer
    ON cancellations (buyer_id, inbox_rank, inbox_at, cancellation_id);

-- R18: messages on a request are audit rows of kind 'message' (actor `buyer:<id>` or
-- `seller:<id>`, detail the text); the audit table takes any kind, so nothing changes there.
