"""Studies: one request that searches the training setup that works for the user's data and
compares the best multi-task model with single-task models and with plain `sum` weighting.

* `spec`: the request (base config, search space over config paths, objective, budget,
  selection, sampler, pruner, baselines), its checks, and the objective of a report.
* `records`: the study, its trials and the verdict, as stored and returned.
* `store`: the study in Redis (the driver's side and the API's).

The driver that runs studies (Optuna: sampler, pruner, journal in this Redis) is
`worker.studies`; the routes are `app.api.routes.studies`.
"""
