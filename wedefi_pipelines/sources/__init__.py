"""Sources of market data: the synthetic market (default), a CoinGecko-style HTTP price API
and price files (CSV/Parquet). Each is plain Python; `resources` wraps them for Dagster."""
