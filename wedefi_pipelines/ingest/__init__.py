"""The write paths of ingestion: validation and COPY formatting (pure), the price load
path, balance and governance upserts, portfolio/position ticks, risk correlations and the
history seeder. Plain Python over psycopg connections; the Dagster assets stay thin."""
