-- inferflow feature store on PostgreSQL, schema version 1. Applied by inferflow at start-up when
-- feature_store.create_schema is on (src/feature_store/sql.rs), each version once, recorded in
-- inferflow_schema_migrations; or by hand, in version order, before starting inferflow.
--
-- Keys: entity types, ids, feature and group names may be up to 8 KiB each, more than a B-tree
-- index entry holds, so rows are keyed by key_hash, the SHA-256 of the length-prefixed parts
-- (src/feature_store/sql.rs, key_hash), and the parts are kept beside it.
-- Values: the compact JSON text written, in a TEXT column with the "C" collation. Not JSONB:
-- JSONB respells numbers (1e400 becomes 401 digits, -0 becomes 0) and inferflow returns
-- numbers exactly as written; and the byte-wise comparison of the text is the rule for one
-- version written with different values (model.rs, same_version_wins).
-- Times are Unix milliseconds; expires_at_ms is NULL for data that does not expire.

CREATE TABLE IF NOT EXISTS features (
    key_hash      BYTEA PRIMARY KEY,
    entity_type   TEXT NOT NULL,
    entity_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    values_json   TEXT COLLATE "C" NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT
);

CREATE INDEX IF NOT EXISTS features_expiry ON features (expires_at_ms)
    WHERE expires_at_ms IS NOT NULL;

CREATE TABLE IF NOT EXISTS feature_history (
    key_hash      BYTEA NOT NULL,
    version       BIGINT NOT NULL,
    entity_type   TEXT NOT NULL,
    entity_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    values_json   TEXT COLLATE "C" NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    PRIMARY KEY (key_hash, version)
);

CREATE INDEX IF NOT EXISTS feature_history_expiry ON feature_history (expires_at_ms)
    WHERE expires_at_ms IS NOT NULL;

CREATE TABLE IF NOT EXISTS feature_groups (
    name_hash     BYTEA NOT NULL,
    version       BIGINT NOT NULL,
    name          TEXT NOT NULL,
    entity_type   TEXT NOT NULL,
    features_json TEXT NOT NULL,
    description   TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name_hash, version)
);
