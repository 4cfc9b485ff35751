"""The arithmetic of one parameter server, for one shard ``[lo, hi)`` of the flat parameters.

Every topology runs this and only this on the server side of a step (the star serves the
whole vector, ``lo = 0, hi = n``; sharded and colocated servers one slice each; where the
shards are placed is :mod:`dist_quant.ps.placement`'s business). One step of shard ``s``:

1. ``g_s = decode_mean(rows)`` of the W workers' uplink payloads of this shard; a row that is
   marked non-finite or fails validation is left out (:meth:`ShardServer.aggregate`), so a bad
   payload costs only its own shard's row: the other shards' steps are untouched;
2. ``DecoupledMomentumSGD`` on the shard (MATH 5a): ``m <- mu m + g_s``,
   ``theta_s <- theta_s - eta (m + lambda theta_s)``, or ``AdamW`` (``--optimizer adamw``,
   :mod:`dist_quant.core.optim`, with the 1-bit Adam recipe when ``--onebit-adam-warmup``),
   with the decay of the parameter each coordinate belongs to (weights only unless
   ``--decay-all``). The optimizer is elementwise,
   so splitting a parameter over two shards changes no value: a shard holds one piece per
   parameter it overlaps (the whole parameter, shaped as it is, when the shard covers it);
3. the downlink payload of the shard: ``--downlink none`` sends ``theta_s`` in fp32 (the
   shard's replica is the body of one reused payload buffer, sent as it is); a compressor
   ``C`` sends ``C(theta_s - r_s)`` with this shard's generator and advances the tracked
   replica ``r_s <- r_s + decode(C(theta_s - r_s))``.

Seeds. Shard ``s``'s downlink quantiser draws from ``(seed, DOWNLINK)`` for ``s = 0`` (the
star's stream, so the star is unchanged) and ``(seed, DOWNLINK, s)`` otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_quant.config import TrainConfig
from dist_quant.core.lr_schedule import schedule_from_config
from dist_quant.core.optim import decay_param_groups, make_optimizer
from dist_quant.errors import NonFiniteGradientError, PayloadError
from dist_quant.ps import common


def shard_tags(index: int) -> tuple[int, ...]:
    """Extra seed tags of shard ``index``'s streams: none for shard 0 (the star's streams)."""
    return (index,) if index else ()


class ShardServer:
    """Parameters, momentum, replica and downlink generator of the shard ``[lo, hi)`` of
    ``model``'s flat parameters (``model`` gives the layout and the initial values)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, lo: int, hi: int, index: int,
                 device: torch.device):
        self.cfg, self.device, self.index = cfg, torch.device(device), int(index)
        self.lo, self.hi, self.n = int(lo), int(hi), int(hi) - int(lo)
        self.up = common.uplink_compressor(cfg, stateful=False)
        self.down = common.downlink_compressor(cfg)
        self.gen = common.generator(self.device, cfg.seed, common.DOWNLINK,
                                    *shard_tags(self.index))
        init = common.flat_params(model)[self.lo:self.hi].to(self.device)
        # theta is the replica (the body of the one downlink payload) when theta goes down
        self.down_buf: torch.Tensor | None = None
        if cfg.downlink == "none":
            self.down_buf, self.replica = self.down.payload_buffer(self.n, self.device)
            self.replica.copy_(init)
            self.theta = self.replica
        else:
            self.replica = init.clone()
            self.theta = init.clone()
        self.pieces, groups = self._pieces(model)
        # --worker-momentum: the workers' payloads already hold the momentum
        momentum = 0.0 if cfg.worker_momentum else cfg.momentum
        self.opt = make_optimizer(cfg, groups, schedule=schedule_from_config(cfg),
                                  momentum=momentum)
        self.g = torch.empty_like(self.replica)
        self.delta = torch.empty_like(self.replica)
        self.step = 0

    def _pieces(self, model: nn.Module) -> tuple[list[tuple[nn.Parameter, int, int]], list[dict]]:
        """Leaf tensors that are views of ``theta`` (one per parameter the shard overlaps), in
        the parameter groups of ``decay_param_groups`` (same order, same decay)."""
        source = decay_param_groups(model, self.cfg.weight_decay, self.cfg.decay_all)
        group_of = {id(p): gi for gi, g in enumerate(source) for p in g["params"]}
        pieces, members = [], [[] for _ in source]
        offset = 0
        for p in model.parameters():
            a, b = max(offset, self.lo), min(offset + p.numel(), self.hi)
            if a < b:
                view = self.theta[a - self.lo:b - self.lo]
                if b - a == p.numel():
                    view = view.view_as(p)
                leaf = nn.Parameter(torch.empty(0, device=self.device))
                leaf.data = view
                pieces.append((leaf, a - self.lo, b - self.lo))
                members[group_of[id(p)]].append(leaf)
            offset += p.numel()
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
                  for g, ps in zip(source, members, strict=True) if ps]
        return pieces, groups

    def aggregate(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, list[str]]:
        """Mean of the valid rows' decodes (None if none is valid), and why rows were left out
        (``"worker i: reason"``)."""
        if hasattr(self.up, "aggregate"):  # shifted compression: the shifts live there
            return self.up.aggregate(rows, out=self.g)
        try:
            return self.up.decode_mean(rows, out=self.g), []
        except (PayloadError, NonFiniteGradientError):
            pass
        good, bad = [], []
        for i in range(rows.shape[0]):
            try:
                self.up.decode(rows[i])
                good.append(i)
            except (PayloadError, NonFiniteGradientError) as err:
                bad.append(f"worker {i}: {err}")
        return (self.up.decode_mean(rows[good], out=self.g) if good else None), bad

    @torch.no_grad()
    def update(self, g: torch.Tensor | None, at_step: int | None = None) -> None:
        """One optimizer step with the mean gradient ``g`` (none: parameters and momentum stay).
        ``at_step``: the step whose learning rate the schedule gives this update (an
        asynchronous server makes several updates per step); default: the update's number."""
        if at_step is not None and self.opt.schedule is not None:
            for group in self.opt.param_groups:
                group["updates"] = at_step - 1
        if g is not None:
            for leaf, a, b in self.pieces:
                leaf.grad = g[a:b].view_as(leaf).clone()
            self.opt.step()
        else:
            self.opt.skip_step()
        self.step += 1

    @torch.no_grad()
    def downlink(self, replica: torch.Tensor | None = None) -> torch.Tensor:
        """The shard's downlink payload (flat uint8); advances the tracked ``replica`` (default
        the one replica of a synchronous run; an asynchronous server tracks one per group of
        workers that read the same versions, :mod:`dist_quant.ps.async_server`)."""
        if self.down_buf is not None:  # theta is the replica, the body of the payload
            payload = self.down.seal(self.down_buf).to_tensor()
        else:
            replica = self.replica if replica is None else replica
            change = torch.sub(self.theta, replica, out=self.delta)
            payload = self.down.encode(change, generator=self.gen).to_tensor()
            replica.add_(self.down.decode(payload, out=self.delta))
        return payload if payload.device == self.device else payload.to(self.device)

    def up_nbytes(self) -> int:
        return self.up.payload_nbytes(self.n)

    def down_nbytes(self) -> int:
        return self.down.payload_nbytes(self.n)

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "lo": self.lo, "hi": self.hi, "step": self.step,
                "theta": self.theta.to("cpu", copy=True), "optimizer": self.opt.state_dict(),
                "replica": self.replica.to("cpu", copy=True), "generator": self.gen.get_state(),
                **({"uplink": self.up.state_dict()} if hasattr(self.up, "state_dict") else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (int(state["lo"]), int(state["hi"])) != (self.lo, self.hi):
            raise ValueError(f"shard {self.index} [{self.lo}, {self.hi}) was given the state of "
                             f"[{state['lo']}, {state['hi']})")
        self.step = int(state["step"])
        self.theta.copy_(state["theta"])
        self.opt.load_state_dict(state["optimizer"])
        self.replica.copy_(state["replica"])
        self.gen.set_state(state["generator"])
        if hasattr(self.up, "load_state_dict"):
            self.up.load_state_dict(state["uplink"])
