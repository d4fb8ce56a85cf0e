"""Resources: the database with read/write routing, and (per domain) the archive store,
cache, price and balance sources and alert sink."""
