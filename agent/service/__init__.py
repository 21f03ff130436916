"""The service core: `sessions` (state machine, tiers, TTL, exec, destroy), `journal`
(SQLite WAL metadata for crash recovery), `spool` (durable CDP spool)."""
