-- Cold tier, issue 14: the Apache Iceberg catalog of the archive, kept in the app's database.
--
-- These are the tables of pyiceberg's SqlCatalog (schema "v1", with iceberg_type), which
-- are also those of Iceberg Java's JdbcCatalog: Spark or Trino can use this catalog too.
-- They live in a schema of their own, so the app's `public` schema (and Prisma's view of
-- it) is untouched; the catalog's connection reaches them through its search_path
-- (`options=-c search_path=iceberg_catalog`) and is opened with init_catalog_tables off,
-- so no client ever creates or alters them: this file is their only definition.
--
-- One row per Iceberg table (catalog 'wedefi', namespace 'wedefi', tables named after the
-- archived tables). Its metadata_location is swapped with a compare-and-set
-- (UPDATE ... WHERE metadata_location = <the one read>) in the same transaction that
-- records an archive, restores a month or upgrades an object (tiering/iceberg.py).

CREATE SCHEMA IF NOT EXISTS iceberg_catalog;

CREATE TABLE IF NOT EXISTS iceberg_catalog.iceberg_tables (
    catalog_name VARCHAR(255) NOT NULL,
    table_namespace VARCHAR(255) NOT NULL,
    table_name VARCHAR(255) NOT NULL,
    metadata_location VARCHAR(1000),
    previous_metadata_location VARCHAR(1000),
    iceberg_type VARCHAR(5),
    PRIMARY KEY (catalog_name, table_namespace, table_name)
);

CREATE TABLE IF NOT EXISTS iceberg_catalog.iceberg_namespace_properties (
    catalog_name VARCHAR(255) NOT NULL,
    namespace VARCHAR(255) NOT NULL,
    property_key VARCHAR(255) NOT NULL,
    property_value VARCHAR(1000) NOT NULL,
    PRIMARY KEY (catalog_name, namespace, property_key)
);
