"""The MLP of dist_quant: He-initialised ReLU blocks, BatchNorm, dropout by keep probability.

Architecture (``build_mlp``): for every hidden width ``n_k``

    Linear(n_{k-1}, n_k, bias=not batchnorm) -> BatchNorm1d(n_k) -> ReLU -> KeepDropout(p)

then a final ``Linear(n_last, out_features)`` with bias. BatchNorm can be switched off; the
hidden Linear then keeps its bias. KeepDropout is left out when ``keep_prob == 1``.

Initialisation (MATH 1). A pre-activation ``a = w^T x`` with i.i.d. zero-mean weights of
variance ``v`` and inputs of second moment ``chi`` has ``V[a] = n v chi`` (1a); its law is
symmetric when the weights' law is (1b), so after a ReLU ``E[y^2] = V[a] / 2`` (1c). Layer k
therefore has ``alpha_k = (1/2) n_{k-1} v_k alpha_{k-1}`` (1d): the second moment is kept through
depth iff ``v_k = 2 / n_{k-1}`` (He et al. 2015, "Delving deep into rectifiers", fan-in mode).
Hidden weights are drawn from ``N(0, gain^2 * c / fan_in)`` with ``c = 2`` for ``"he"``, ``1`` for
``"lecun"`` (the second moment halves per layer) and ``4`` for ``"double"`` (it doubles). The
final Linear (no ReLU after it) uses ``c = 1``; every bias starts at zero; BatchNorm starts at
scale 1, shift 0. All draws come from the ``generator`` given, so a seed fixes the model.

BatchNorm naming (MATH 2). The sheet writes ``BN(a) = (a - mu_B) / sigma_B * beta + gamma``:
its beta is the SCALE and its gamma the SHIFT. torch's ``BatchNorm1d.weight`` is the scale
(the sheet's beta) and ``BatchNorm1d.bias`` the shift (the sheet's gamma).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from dist_quant.errors import ConfigError

# name -> c in Var[w] = gain^2 * c / fan_in
INIT_VARIANCE = {"he": 2.0, "lecun": 1.0, "double": 4.0}


def check_keep_prob(keep_prob: float) -> float:
    """``keep_prob`` as a float, or ConfigError naming ``--keep-prob`` outside (0, 1]."""
    if not 0.0 < keep_prob <= 1.0:
        raise ConfigError("--keep-prob", f"keep probability must be in (0, 1], got {keep_prob}")
    return float(keep_prob)


class KeepDropout(nn.Module):
    """Inverted dropout configured by the KEEP probability ``p`` (MATH 3).

    In training mode each input is kept with probability ``p`` and multiplied by ``1 / p``,
    otherwise set to 0: ``Z = 1/p`` w.p. ``p`` and ``0`` w.p. ``1 - p`` has ``E[Z] = 1``, so
    ``E[output] = input`` and nothing is rescaled at test time (eval mode is the identity).
    torch's ``nn.Dropout(q)`` computes the same with the DROP probability ``q = 1 - p``.

    With a ``generator`` the masks are drawn from it (it must live on the input's device);
    without one the global generator is used, as ``nn.Dropout`` does.
    """

    def __init__(self, keep_prob: float, generator: torch.Generator | None = None):
        super().__init__()
        self.keep_prob = check_keep_prob(keep_prob)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.keep_prob
        if not self.training or p == 1.0:
            return x
        if self.generator is None:
            return nn.functional.dropout(x, 1.0 - p, training=True)
        keep = torch.empty_like(x).bernoulli_(p, generator=self.generator)
        return x * keep / p

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob}"


def init_linear_(
    linear: nn.Linear, variance_factor: float, gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Linear:
    """Draw ``linear.weight`` from ``N(0, gain^2 * variance_factor / fan_in)``, zero the bias."""
    std = gain * (variance_factor / linear.in_features) ** 0.5
    with torch.no_grad():
        nn.init.normal_(linear.weight, 0.0, std, generator=generator)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


def build_mlp(
    in_features: int,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    keep_prob: float = 1.0,
    batchnorm: bool = True,
    init: str = "he",
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    dropout_generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Build the MLP described in the module docstring.

    ``keep_prob`` is the dropout KEEP probability (1 disables dropout). ``init`` is one of
    ``he`` (Var 2/fan_in), ``lecun`` (1/fan_in), ``double`` (4/fan_in) for the hidden Linears,
    ``gain`` multiplies their std. ``generator`` draws the initial weights,
    ``dropout_generator`` (optional) the dropout masks.
    """
    hidden = tuple(int(h) for h in hidden)
    if in_features < 1 or out_features < 1:
        raise ConfigError("--hidden", f"in/out features must be >= 1, got {in_features}, "
                          f"{out_features}")
    if any(h < 1 for h in hidden):
        raise ConfigError("--hidden", f"hidden widths must be >= 1, got {hidden}")
    if init not in INIT_VARIANCE:
        raise ConfigError("--init", f"unknown init {init!r}; choose from {sorted(INIT_VARIANCE)}")
    if not gain > 0:
        raise ConfigError("gain", f"gain must be > 0, got {gain}")
    check_keep_prob(keep_prob)

    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        linear = nn.Linear(width, h, bias=not batchnorm)
        layers.append(init_linear_(linear, INIT_VARIANCE[init], gain, generator))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if keep_prob < 1.0:
            layers.append(KeepDropout(keep_prob, dropout_generator))
        width = h
    layers.append(init_linear_(nn.Linear(width, out_features), 1.0, 1.0, generator))
    return nn.Sequential(*layers)


def linear_positions(model: nn.Sequential) -> list[int]:
    """Indices (into ``model``) of its ``nn.Linear`` modules, in order."""
    return [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]


@torch.no_grad()
def insert_batchnorm(
    model: nn.Sequential, linear_index: int, batch: torch.Tensor, eps: float = 1e-5,
) -> nn.Sequential:
    """Return a copy of ``model`` with a BatchNorm1d right after its ``linear_index``-th Linear
    (0-based, counting Linear modules only), set so that the outputs on ``batch`` are unchanged
    (MATH 2c).

    Let ``a`` be that Linear's output on ``batch`` with batch mean ``mu_B`` and biased variance
    ``var_B``. BN computes ``(a - mu_B) / sqrt(var_B + eps) * scale + shift``; with
    ``scale = sqrt(var_B + eps)`` (torch ``weight``, the sheet's beta) and ``shift = mu_B``
    (torch ``bias``, the sheet's gamma) this is ``a`` again. The running statistics are set to
    ``mu_B`` and ``var_B``, so eval mode (which normalises with them) gives ``a`` too.

    ``a`` is computed with the layers before it in eval mode (no dropout noise). Train-mode
    outputs match when those layers are deterministic (no dropout before it, no BN in train mode
    whose statistics differ from its running ones). One train-mode forward pass updates the
    running variance with torch's unbiased estimate, so evaluate in eval mode first or copy.
    """
    positions = linear_positions(model)
    if not 0 <= linear_index < len(positions):
        raise ValueError(f"linear_index {linear_index} out of range: model has "
                         f"{len(positions)} Linear layers")
    pos = positions[linear_index]
    if batch.ndim != 2 or batch.shape[0] < 2:
        raise ValueError(f"batch must be [N >= 2, features], got shape {tuple(batch.shape)}")

    new = copy.deepcopy(model)
    was_training = new.training
    new.eval()
    a = new[: pos + 1](batch)
    new.train(was_training)
    mean = a.mean(dim=0)
    var = a.var(dim=0, unbiased=False)

    linear = new[pos]
    bn = nn.BatchNorm1d(linear.out_features, eps=eps, device=a.device, dtype=a.dtype)
    bn.weight.copy_(torch.sqrt(var + eps))  # scale: the sheet's beta
    bn.bias.copy_(mean)  # shift: the sheet's gamma
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.train(was_training)
    modules = list(new)
    modules.insert(pos + 1, bn)
    out = nn.Sequential(*modules)
    out.train(was_training)
    return out
