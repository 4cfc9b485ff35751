"""``dist-quant verify``: an empirical check of every numbered claim of the mathematics.

One module per part: :mod:`init_claims` (1a-1d), :mod:`bn_claims` (2a-2c, 3),
:mod:`quant_claims` (4a-4e), :mod:`bucket_claims` (4f-4i), :mod:`optim_claims` (5a-5d). Each
claim is a function ``(Context) -> list[Row]``; :mod:`report` builds and prints the rows.
"""

from dist_quant.verify.command import ALL_CLAIMS, run_claims, verify

__all__ = ["ALL_CLAIMS", "run_claims", "verify"]
