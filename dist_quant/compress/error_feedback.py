"""Error feedback: carry what compression dropped into the next step (Seide et al. 2014;
Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").

State: a residual ``e`` (float32, one per worker, zero at start). Each step
``c = g + e``, send ``C(c)``, keep ``e <- c - decode(C(c))``. So
``decoded + new residual == input + old residual`` (exactly, up to one float32 rounding), and the
sum of everything the server received over T steps differs from the sum of the true gradients by
the current residual only. This is what makes a biased compressor (``sign``) usable; around an
unbiased one it trades variance for a bounded delay.

The wrapper is stateful (the only stateful compressor); ``state_dict``/``load_state_dict`` carry
the residual through checkpoints. Payloads are the inner compressor's, unchanged.
"""

from __future__ import annotations

import torch

from dist_quant.compress.base import Compressor, Wrapper, count_nonfinite
from dist_quant.errors import NonFiniteGradientError


class ErrorFeedback(Wrapper):
    def __init__(self, inner: Compressor):
        if isinstance(inner, ErrorFeedback):
            raise ValueError("error_feedback: the inner compressor is already wrapped")
        self.inner = inner
        self.name = inner.name
        self.residual: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.inner!r})"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None):
        flat = x.reshape(-1)
        count = count_nonfinite(flat)
        if count:  # the residual stays as it was: nothing was sent
            raise NonFiniteGradientError(count, flat.numel())
        if self.residual is None:
            self.residual = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        elif self.residual.numel() != flat.numel():
            raise ValueError(f"error feedback residual has {self.residual.numel()} coordinates, "
                             f"the tensor has {flat.numel()}")
        corrected = flat.float() + self.residual
        payload = self.inner.encode(corrected, generator=generator)
        # the old residual's buffer receives the decode: one allocation per step, not two
        self.residual = corrected.sub_(self.inner.decode(payload, out=self.residual))
        return payload

    def decode(self, payload, out=None):
        return self.inner.decode(payload, out=out)

    def decode_mean(self, batch, out=None):
        return self.inner.decode_mean(batch, out=out)

    def state_dict(self) -> dict:
        return {"residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        residual = state["residual"]
        self.residual = None if residual is None else residual.detach().clone().float()
