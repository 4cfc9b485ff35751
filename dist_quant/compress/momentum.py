"""Compressed momentum: each worker keeps its own momentum and compresses that, not its
gradient (the momentum correction of Lin et al. 2018, "Deep Gradient Compression"; the
compressed momentum of Tang et al. 2021, "1-bit Adam").

Worker ``i`` keeps ``m_i`` (float32, zero at start) and, each step,
``m_i <- mu m_i + g_i`` and sends ``C(m_i)`` (``C`` usually wrapped in error feedback, so what
it drops is sent later). The server decodes and averages, ``u = mean_i decode(C(m_i))``, and
applies the decoupled rule with no momentum of its own (MATH 5a with ``mu = 0``):
``theta <- theta - eta (u + lambda theta)``.

Why this is the same method. Momentum is linear: ``mean_i m_i`` obeys
``M <- mu M + mean_i g_i``, the server's buffer in the usual exchange. Without compression the
two exchanges give the same parameters (up to float rounding, the order of the sums differs);
an lr schedule changes nothing since ``eta`` multiplies ``M`` after the recurrence.

Why it can cost fewer steps. With the gradient compressed, the server's momentum sums each
step's compression error with weights ``eta / (1 - mu)`` in total, and error feedback then
delays that error through the momentum filter (a stale, amplified correction). Compressing the
momentum puts the momentum inside the feedback loop: the error ``e`` carried by error feedback
is the only difference between ``sum_t mean_i m_i`` and what the server received, so
``theta_T`` differs from the uncompressed run's by ``eta`` times the current residual (plus the
effect of the earlier residuals on the gradients), never by an accumulation of it.

Variance and bias are the inner compressor's, applied to ``m_i`` instead of ``g_i``. Note that
``||m_i||`` is about ``1 / (1 - mu)`` times ``||g_i||``: a scale-free compressor (sign, onebit,
kbit per bucket) does not care; its relative error is what matters.

Stateful (``state_dict`` carries ``m`` and the inner compressor's state). A non-finite
gradient leaves ``m`` as it was (nothing is sent, as the inner compressor would).
"""

from __future__ import annotations

import torch

from dist_quant.compress.base import Wrapper, count_nonfinite
from dist_quant.errors import NonFiniteGradientError


class WorkerMomentum(Wrapper):
    def __init__(self, inner, momentum: float):
        if isinstance(inner, WorkerMomentum):
            raise ValueError("worker momentum: the inner compressor is already wrapped")
        if isinstance(momentum, bool) or not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"worker momentum: momentum must be in [0, 1); got {momentum!r}")
        self.inner, self.momentum = inner, float(momentum)
        self.name = inner.name
        self.buffer: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"WorkerMomentum({self.inner!r}, momentum={self.momentum})"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None):
        flat = x.reshape(-1)
        count = count_nonfinite(flat)
        if count:  # the buffer stays as it was: nothing is sent
            raise NonFiniteGradientError(count, flat.numel())
        if self.buffer is None:
            self.buffer = flat.float().clone()
        elif self.buffer.numel() != flat.numel():
            raise ValueError(f"worker momentum buffer has {self.buffer.numel()} coordinates, "
                             f"the tensor has {flat.numel()}")
        else:
            self.buffer.mul_(self.momentum).add_(flat.float())
        return self.inner.encode(self.buffer, generator=generator)

    def decode(self, payload, out=None):
        return self.inner.decode(payload, out=out)

    def decode_mean(self, batch, out=None):
        return self.inner.decode_mean(batch, out=out)

    def state_dict(self) -> dict:
        inner = self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}
        return {"momentum_buffer": None if self.buffer is None else self.buffer.clone(),
                "inner": inner}

    def load_state_dict(self, state: dict) -> None:
        buf = state["momentum_buffer"]
        self.buffer = None if buf is None else buf.detach().clone().float()
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state["inner"])


class AdamMomentum(Wrapper):
    """The worker's half of the 1-bit Adam recipe (:class:`dist_quant.core.optim.AdamW` with
    ``freeze_after = K``). Worker ``i`` keeps ``m_i`` (float32, zero at start) and, at its
    ``t``-th encode, ``m_i <- beta1 m_i + (1 - beta1) g_i``; it sends ``C(g_i)`` for
    ``t <= K`` (the warm-up: the server runs AdamW on the mean gradient) and ``C(m_i)`` after
    (the server has frozen ``v`` and takes the mean as its momentum). ``C`` is the inner
    compressor, with error feedback (its residual carries over the switch). One encode is one
    step (synchronous runs only); a non-finite gradient counts its step and leaves ``m_i``
    as it was (nothing is sent; the server skips the row). Stateful: ``state_dict`` carries
    ``m_i``, the step count and the inner compressor's state."""

    def __init__(self, inner, beta1: float, warmup: int):
        if isinstance(inner, WorkerMomentum | AdamMomentum):
            raise ValueError("1-bit Adam: the inner compressor is already wrapped")
        if not 0.0 <= float(beta1) < 1.0 or int(warmup) < 1:
            raise ValueError(f"1-bit Adam: need beta1 in [0, 1) and warmup >= 1; got "
                             f"{beta1!r}, {warmup!r}")
        self.inner, self.beta1, self.warmup = inner, float(beta1), int(warmup)
        self.name = inner.name
        self.buffer: torch.Tensor | None = None
        self.steps = 0

    def __repr__(self) -> str:
        return f"AdamMomentum({self.inner!r}, beta1={self.beta1}, warmup={self.warmup})"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None):
        flat = x.reshape(-1)
        self.steps += 1
        count = count_nonfinite(flat)
        if count:
            raise NonFiniteGradientError(count, flat.numel())
        if self.buffer is None:
            self.buffer = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        self.buffer.lerp_(flat.float(), 1.0 - self.beta1)
        return self.inner.encode(flat if self.steps <= self.warmup else self.buffer,
                                 generator=generator)

    def decode(self, payload, out=None):
        return self.inner.decode(payload, out=out)

    def decode_mean(self, batch, out=None):
        return self.inner.decode_mean(batch, out=out)

    def state_dict(self) -> dict:
        inner = self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}
        return {"momentum_buffer": None if self.buffer is None else self.buffer.clone(),
                "steps": self.steps, "inner": inner}

    def load_state_dict(self, state: dict) -> None:
        buf = state["momentum_buffer"]
        self.buffer = None if buf is None else buf.detach().clone().float()
        self.steps = int(state["steps"])
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state["inner"])
