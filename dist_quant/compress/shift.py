"""Shifted compression: one mechanism for DIANA and EF21.

Worker ``i`` keeps a shift ``h_i`` (float32, zero at start); the server keeps a copy of every
worker's shift, exactly as it tracks the downlink replicas. Each step:

- worker ``i`` sends ``C(g_i - h_i)`` and sets ``h_i <- h_i + alpha d_i`` with
  ``d_i = decode(C(g_i - h_i))``;
- the server estimates the mean gradient by ``ghat = mean_i (h_i + d_i)`` (``h_i`` before its
  update) and applies the same update to its copies. Nothing but ``C(g_i - h_i)`` travels: the
  shifts cost memory (``W n`` floats at the server, ``n`` per worker), not bytes.

Unbiased ``C`` (``C.unbiased``: onebit, kbit, qsgd, terngrad, randk): DIANA (Mishchenko et
al. 2019). ``E[d_i] = g_i - h_i``, so ``E[ghat] = mean g_i``: unbiased for any shift. Its
variance is ``(1 / W^2) sum_i V[C(g_i - h_i)] <= (omega / W^2) sum_i ||g_i - h_i||^2``, with
``omega`` the compressor's variance factor (``E ||C(x) - x||^2 <= omega ||x||^2``): it shrinks as
the shifts learn the gradients. The shift is stable for ``alpha <= 1 / (1 + omega)``; on a fixed
gradient ``E[g - h_{t+1}] = (1 - alpha) E[g - h_t]`` and the variance goes to zero.

Contractive ``C`` (``C.contractive``: sign, topk) with ``alpha = 1``: EF21 (Richtarik et al.
2021). Then ``h_i <- h_i + C(g_i - h_i)`` and ``ghat = mean_i h_i`` after the update (the
invariant the tests check): biased, but ``||h_i - g_i||^2`` contracts by ``1 - delta`` per step
on a fixed gradient (``delta`` the contraction factor), so the bias vanishes where the gradient
settles.

``--shift-rate auto`` takes ``alpha = 1 / (1 + omega)`` with the bound of :func:`omega`, the
compressor's own ``omega(n)`` (1 for the contractive compressors, fp16/bf16/none among them).
A non-finite gradient leaves the shift as it was on both sides (nothing was sent, the server
leaves the row out). A row the server leaves out for another reason (a payload damaged in
transit) moves the worker's shift but not the server's copy of it; the copies then differ until
the run ends (as any lost update would), and the row is reported as left out.
"""

from __future__ import annotations

import math

import torch

from dist_quant.compress.base import Wrapper
from dist_quant.errors import NonFiniteGradientError, PayloadError


def parse_shift_rate(text: str) -> float | None:
    """``"auto"`` -> None; otherwise the rate in [0, 1] (ValueError naming the problem)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        alpha = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"must be auto or a number in [0, 1]; got {text!r}") from None
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"must be auto or a number in [0, 1]; got {text!r}")
    return alpha


def omega(comp, n: int) -> float:
    """The variance factor that sets the auto rate of ``comp`` on ``n`` coordinates: 0 for a
    contractive compressor (the exact ones among them), whose safe rate is 1; else the bound
    ``comp.omega(n)`` (``ValueError`` where it has none).

    The bounds: onebit/kbit ``d / (2 L^2)`` with ``L = 2^k - 1`` on buckets of ``d``; qsgd
    ``min(d / s^2, sqrt(d) / s)``; terngrad ``sqrt(d) - 1``; randk ``n / k - 1`` (each in its
    class's docstring)."""
    if comp.contractive:
        return 0.0
    bound = comp.omega(n)
    if bound is None:
        raise ValueError(f"shifted compression: no variance bound for compressor {comp.name!r}")
    return bound


def resolve_rate(rate: float | None, comp, n: int) -> float:
    """The rate to use: ``rate`` as given, or ``1 / (1 + omega)`` for auto (None)."""
    return 1.0 / (1.0 + omega(comp, n)) if rate is None else float(rate)


class ShiftedWorker(Wrapper):
    """A worker's side: sends ``C(g - h)``, then ``h <- h + alpha decode(C(g - h))``."""

    def __init__(self, inner, rate: float | None):
        self.inner, self.rate = inner, rate
        self.name = inner.name
        self.shift: torch.Tensor | None = None
        self.alpha: float | None = None

    def __repr__(self) -> str:
        return f"ShiftedWorker({self.inner!r}, rate={'auto' if self.rate is None else self.rate})"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None):
        flat = x.reshape(-1)
        if self.shift is None:
            self.shift = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
            self.alpha = resolve_rate(self.rate, self.inner, flat.numel())
        elif self.shift.numel() != flat.numel():
            raise ValueError(f"shift has {self.shift.numel()} coordinates, the tensor has "
                             f"{flat.numel()}")
        # a non-finite x raises in the inner encode, before the shift moves
        payload = self.inner.encode(flat.float() - self.shift, generator=generator)
        self.shift.add_(self.inner.decode(payload), alpha=self.alpha)
        return payload

    def decode(self, payload, out=None):
        return self.inner.decode(payload, out=out)

    def state_dict(self) -> dict:
        return {"shift": None if self.shift is None else self.shift.clone(), "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        shift = state["shift"]
        self.shift = None if shift is None else shift.detach().clone().float()
        self.alpha = state["alpha"]


class ShiftedServer:
    """The server's side: every worker's shift, and the estimate ``mean_i (h_i + d_i)`` over
    the rows that arrive (:meth:`aggregate`)."""

    def __init__(self, inner, rate: float | None):
        self.inner, self.rate = inner, rate
        self.name = inner.name
        self.shifts: torch.Tensor | None = None  # [W, n]
        self.alpha: float | None = None

    def __repr__(self) -> str:
        return f"ShiftedServer({self.inner!r}, rate={'auto' if self.rate is None else self.rate})"

    def payload_nbytes(self, n: int) -> int:
        return self.inner.payload_nbytes(n)

    def decode(self, payload, out=None):
        return self.inner.decode(payload, out=out)

    def aggregate(self, rows: torch.Tensor, out: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor | None, list[str]]:
        """``(mean over valid rows of h_i + d_i, why rows were left out)``; then
        ``h_i <- h_i + alpha d_i`` for every valid row. None when no row is valid."""
        decoded, good, bad = [], [], []
        for i in range(rows.shape[0]):
            try:
                decoded.append(self.inner.decode(rows[i]))
                good.append(i)
            except (PayloadError, NonFiniteGradientError) as err:
                bad.append(f"worker {i}: {err}")
        if not good:
            return None, bad
        n = decoded[0].numel()
        if self.shifts is None:
            self.shifts = torch.zeros(rows.shape[0], n, dtype=torch.float32, device=rows.device)
            self.alpha = resolve_rate(self.rate, self.inner, n)
        total = torch.zeros(n, dtype=torch.float32, device=rows.device)
        for i, d in zip(good, decoded, strict=True):
            total.add_(self.shifts[i]).add_(d)
        mean = total.div_(len(good))
        for i, d in zip(good, decoded, strict=True):
            self.shifts[i].add_(d, alpha=self.alpha)
        return (mean if out is None else out.copy_(mean)), bad

    def state_dict(self) -> dict:
        return {"shifts": None if self.shifts is None else self.shifts.clone(),
                "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        shifts = state["shifts"]
        self.shifts = None if shifts is None else shifts.detach().clone().float()
        self.alpha = state["alpha"]
