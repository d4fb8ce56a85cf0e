"""Dagster definitions by domain: each subpackage exposes `defs` (assets, checks, jobs,
schedules, sensors and the resources only it uses); wedefi_pipelines.definitions merges them."""
