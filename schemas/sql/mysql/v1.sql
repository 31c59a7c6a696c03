-- inferflow feature store on MySQL 8 or MariaDB 10.6+, schema version 1. Applied by inferflow at
-- start-up when feature_store.create_schema is on (src/feature_store/sql.rs), each version once,
-- recorded in inferflow_schema_migrations; or by hand, in version order, before starting it.
--
-- The layout of schemas/sql/postgres/v1.sql (see the notes there). Values are the JSON text
-- written, in a LONGTEXT with a binary collation: MySQL's JSON type stores numbers as doubles
-- (12345678901234567890123 would come back rounded), and the byte-wise comparison of the text
-- is the rule for one version written with different values. On MariaDB, JSON is LONGTEXT anyway.

CREATE TABLE IF NOT EXISTS features (
    key_hash      BINARY(32) NOT NULL PRIMARY KEY,
    entity_type   TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    entity_id     TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name          TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    values_json   LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NULL,
    INDEX features_expiry (expires_at_ms)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS feature_history (
    key_hash      BINARY(32) NOT NULL,
    version       BIGINT NOT NULL,
    entity_type   TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    entity_id     TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name          TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    values_json   LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NULL,
    PRIMARY KEY (key_hash, version),
    INDEX feature_history_expiry (expires_at_ms)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS feature_groups (
    name_hash     BINARY(32) NOT NULL,
    version       BIGINT NOT NULL,
    name          TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    entity_type   TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    features_json LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    description   LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name_hash, version)
) ENGINE = InnoDB;
