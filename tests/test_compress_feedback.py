"""Error feedback algebra and the sign baseline."""

from __future__ import annotations

import pytest
import torch

from dist_quant.compress import ErrorFeedback, get_compressor
from dist_quant.errors import NonFiniteGradientError

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("name", ["onebit", "sign", "kbit"])
def test_decoded_plus_new_residual_is_input_plus_old(name):
    ef = get_compressor(name, bits=2, bucket_size=16, error_feedback=True)
    assert isinstance(ef, ErrorFeedback)
    gen = torch.Generator().manual_seed(0)
    old = torch.zeros(100)
    allowed = torch.zeros(100, dtype=torch.float64)
    total_in, total_out = torch.zeros(100, dtype=torch.float64), torch.zeros(100,
                                                                             dtype=torch.float64)
    for _ in range(20):
        g = torch.randn(100, generator=gen)
        payload = ef.encode(g, generator=gen)
        decoded = ef.decode(payload)
        lhs = decoded.double() + ef.residual.double()
        rhs = g.double() + old.double()
        # two float32 roundings: c = g + old, then residual = c - decoded
        step_rounding = EPS * (rhs.abs() + 2 * decoded.double().abs())
        assert ((lhs - rhs).abs() <= step_rounding).all()
        allowed += step_rounding
        old = ef.residual.clone()
        total_in += g.double()
        total_out += decoded.double()
    # over T steps the server received the true sum up to the current residual only
    assert ((total_out + old.double() - total_in).abs() <= allowed).all()


def test_state_dict_round_trip_and_nonfinite_keeps_residual():
    ef = get_compressor("sign", error_feedback=True)
    gen = torch.Generator().manual_seed(0)
    ef.encode(torch.randn(10, generator=gen), generator=gen)
    state = ef.state_dict()
    other = get_compressor("sign", error_feedback=True)
    other.load_state_dict(state)
    assert torch.equal(other.residual, ef.residual)
    bad = torch.randn(10)
    bad[2] = float("nan")
    before = ef.residual.clone()
    with pytest.raises(NonFiniteGradientError):
        ef.encode(bad, generator=gen)
    assert torch.equal(ef.residual, before)
    with pytest.raises(ValueError, match="residual has 10"):
        ef.encode(torch.randn(11), generator=gen)


def test_sign_scale_is_mean_abs_and_biased():
    comp = get_compressor("sign", bucket_size=3)
    x = torch.tensor([1.0, -2.0, 3.0, -0.5, 0.0])
    y = comp.decode(comp.encode(x))
    assert y.tolist() == [2.0, -2.0, 2.0, -0.25, 0.25]


def test_error_feedback_makes_sign_converge_on_a_quadratic():
    """Minimise ||theta - c||^2 / 2 with sign-compressed gradients: plain sign stalls at a
    distance of the order of the step, error feedback keeps descending."""
    c = torch.randn(200, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 0, 200)
    final = {}
    for ef in (False, True):
        comp = get_compressor("sign", error_feedback=ef)
        theta = torch.zeros(200)
        for _ in range(300):
            theta -= 0.1 * comp.decode(comp.encode(theta - c))
        final[ef] = (theta - c).norm().item()
    assert final[True] < final[False] / 3
