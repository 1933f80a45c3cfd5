"""Quotas: what a user's and a team's plans let them spend, as data (issue 21).

Pure logic, no I/O; the storage backends apply it in their one atomic admission
step, and `gateway/admission.py` drives it per request.

- `limits`: what a limit is (meter, window, maximum, model filter), which limits
  apply, what admission reserves and when a limit refuses; counters and rates.
- `plans`: a plan's limits (and its team's) in checking order, the refusal's
  error code and the ``X-RateLimit-*`` headers an answer carries.
- `budget`: the upper bound of an answer's cost that a money budget reserves.

The modules are imported by name (``from gateway.quota.limits import Limit``):
this file imports nothing, so the storage package can use `limits` without
loading `plans`, which imports the storage package.
"""
