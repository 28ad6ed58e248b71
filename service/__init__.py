"""The job service's shared core: what the API (`app`) and the worker (`worker`) both use.

    app ──> service <── worker ──> mtl          (and app ──> mtl; nothing points back up)

* `settings`: the one `Settings` (environment prefix ``MTL_``), grouped by who reads what.
* `keys`: every Redis key name.
* `records`: the typed job record, event envelope and scores.
* `store` (the worker's side) and `async_store` (the API's side): the job state machine in
  Redis, one Lua script per transition (`lua/*.lua`, loaded by `scripts`).
* `queue`: the Celery app factory and the message of one attempt (the job protocol).
* `datasets`: uploaded datasets: their records, files, and the only way a job names one.
* `client` and `cli`: the HTTP client of the service and the `mtl` commands built on it.
* `embedded`: the local stack's processes (a private redis-server, worker processes).

Installed with the `service` extra (`pip install 'mtl-jobs[service]'`); the library (`mtl`)
imports none of it.
"""
