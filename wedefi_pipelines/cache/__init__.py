"""WeDefiDaily's Redis cache: the key/value contract, the refresh the `redis_cache` asset runs,
invalidation for ingestion, and the read-through CacheManager the API uses.

    contract.py      key names, TTLs, the app's value format (contract v2, pure)
    queries.py       the set-based reads behind every value
    store.py         guarded, pipelined writes to Redis
    refresh.py       refresh everything (the asset)
    invalidation.py  refresh the wallets a balance or governance sync changed
    manager.py       read-through CacheManager with stampede protection and outage behaviour
"""
