"""Every claim check of ``verify``, one test per claim id, on another seed than the command's
default (so each statistical check is exercised on two independent samples)."""

import pytest
import torch

from dist_quant.verify.command import ALL_CLAIMS, claim_id
from dist_quant.verify.report import Context

torch.set_num_threads(1)
SEED = 1


@pytest.fixture(scope="module")
def ctx() -> Context:
    return Context(seed=SEED)  # shared, so cached gradients and draws are computed once


@pytest.mark.parametrize("check", ALL_CLAIMS, ids=claim_id)
def test_claim(check, ctx):
    rows = check(ctx)
    assert rows and all(r.claim == claim_id(check) for r in rows)
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(f"{r.statement}: predicted {r.predicted}, measured "
                                 f"{r.measured}, tolerance {r.tolerance}" for r in failed)
