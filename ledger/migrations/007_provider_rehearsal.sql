-- Rehearsing incidents on the simulator without a restart (`ordercancel provider ...`,
-- docs/runbook.md "Game day"): a slow payment, and provider-wide settings that the running
-- workers read within a second.

ALTER TABLE provider_sim.faults
    ADD COLUMN latency_ms int NOT NULL DEFAULT 0 CHECK (latency_ms >= 0);

-- One row at most: when present it overrides the workers' ORDERCANCEL_SIM_TRANSIENT_RATE and
-- ORDERCANCEL_SIM_LATENCY.
CREATE TABLE provider_sim.settings (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    transient_rate  double precision NOT NULL CHECK (transient_rate >= 0 AND transient_rate <= 1),
    latency_ms      int NOT NULL CHECK (latency_ms >= 0),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
