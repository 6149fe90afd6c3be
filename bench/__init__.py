"""``make bench``: siocluster against python-socketio alone and with RedisManager.

``python -m bench`` runs it (see `bench.__main__` and BENCHMARKS.md): `systems` starts the
processes, `loadgen` is the load generator process, `scenarios` drives it, `apps` holds
the handlers every system runs, `baseline` is the python-socketio server, `stats` and
`report` turn the numbers into the table and the JSON.
"""
