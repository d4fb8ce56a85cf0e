"""Hourly and daily price and portfolio rollups that outlive the raw months (issue 16):
tables (tables.py), their SQL (statements.py), the watermark-driven refresh (refresh.py),
the archive's gate (gate.py), the sampled check (verify.py) and the readers (reads.py)."""
