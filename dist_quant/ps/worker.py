"""A worker: its half of each synchronous step.

Worker ``i`` of ``W`` holds its shard of the training set, a replica of the model, its own
quantiser and dropout generators (seeded from ``(seed, i)``), its batch sampler and, with
``--error-feedback``, its residual. One step (:meth:`Worker.step_up`, then
:meth:`Worker.receive_downlink`):

1. draw the next minibatch of its shard; forward in training mode (BatchNorm normalises with
   this minibatch's statistics and updates the worker's own running statistics);
2. backward the data loss only (the task's loss, by default the mean cross-entropy; the L2
   term lives at the server, MATH 5);
3. flatten every gradient into one vector ``g`` and encode it once per parameter shard
   (one shard for the star), each shard with its own encoder and generator, seeded from
   ``(seed, i, QUANTISER)`` for shard 0 and ``(seed, i, QUANTISER, s)`` for shard s; a
   non-finite shard is never quantised: the worker sends ``nonfinite_payload`` instead, of the
   same size;
4. receive the downlink payloads (one per shard) and, at the start of the next step (with
   ``--overlap``, shard by shard as the next forward reaches the first module that reads the
   shard: :meth:`Worker.receive_downlink`), update the replica: with ``--downlink none`` a
   payload is the server's parameters in fp32; otherwise it is the compressed change
   ``C(theta - r)`` and the replica becomes ``r + decode(C(theta - r))``, exactly what the
   server computes for its copy ``r``, so all replicas stay identical and what compression
   dropped is sent at the next step.

The same :class:`Worker` object serves the distributed run and the single-process simulator
(:mod:`dist_quant.ps.state` places it on a rank; the steps move its payloads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.data import worker_batches
from dist_quant.errors import NonFiniteGradientError, RunAborted, WorkerLeaves  # noqa: F401 (re-exported)
from dist_quant.ps import common
from dist_quant.ps.overlap import OverlappedBackward, apply_before_use
from dist_quant.ps.shard import shard_tags
from dist_quant.ps.task import Task
from dist_quant.runtime.phasetime import Clocks, charge, now

# worker -> leader, per step (float64): seconds of wall time, then of this thread's CPU time
TELEMETRY = ("loss", "decode", "compute", "encode", "overlap", "overlap_down",
             "cpu_decode", "cpu_compute", "cpu_encode")


class Worker:
    def __init__(self, cfg: TrainConfig, task: Task, index: int, device: torch.device,
                 bounds: list[tuple[int, int]] | None = None):
        self.cfg, self.index, self.device = cfg, int(index), torch.device(device)
        self.task = task
        shard = task.data.shard(index, cfg.workers)
        self.x, self.y = shard.x_train.to(self.device), shard.y_train.to(self.device)
        self.sampler = worker_batches(len(self.y), cfg.batch_size, cfg.seed, index)
        self.lost: list[int] = []   # workers dropped so far, in order (their data is shared)
        self.dropout_gen = common.generator(self.device, cfg.seed, index, common.DROPOUT)
        self.model = task.model(self.device, dropout_generator=self.dropout_gen)
        flat = common.flat_params(self.model)
        self.n = flat.numel()
        self.n_stats = common.bn_stats(self.model).numel()
        # one uplink encoder and quantiser stream per parameter shard (one shard: the star)
        self.bounds = list(bounds) if bounds is not None else [(0, self.n)]
        self.gens = [common.generator(self.device, cfg.seed, index, common.QUANTISER,
                                      *shard_tags(s)) for s in range(len(self.bounds))]
        self.comps = [common.uplink_compressor(cfg, stateful=True) for _ in self.bounds]
        self.gen, self.comp = self.gens[0], self.comps[0]
        self.down = common.downlink_compressor(cfg)
        # the downlink is received into one reused buffer; with --downlink none its body is the
        # replica itself, so receiving is decoding (what is left is the header's validation)
        if len(self.bounds) > 1:  # one inbox per shard, decoded into the replica's slice
            self.replica = flat.clone()
            self.inboxes = [torch.empty(self.down.payload_nbytes(hi - lo), dtype=torch.uint8,
                                        device=self.device) for lo, hi in self.bounds]
            self.inbox = None
        elif cfg.downlink == "none":
            self.inbox, self.replica = self.down.payload_buffer(self.n, self.device)
            self.replica.copy_(flat)
        else:
            self.inbox = torch.empty(self.down.payload_nbytes(self.n), dtype=torch.uint8,
                                     device=self.device)
            self.replica = flat.clone()
        if len(self.bounds) == 1:
            self.inboxes = [self.inbox]
        # the model's parameters are views of the replica: they read each downlink in place
        self.params = common.ParamViews(self.model, self.replica, alias=True)
        self.decoded = torch.empty_like(self.replica)  # reused downlink decode (compressed)
        self.nonfinite_at = cfg.nonfinite_at
        # --slow-worker: wall time only (the simulator takes its arrival order from it instead)
        self.slow = 1.0 if cfg.simulate else cfg.slow_factors.get(self.index, 1.0)
        self.step = 0
        # downlink payloads not yet decoded, one per shard: a function returning the payload
        # (with --overlap it waits for the payload's arrival); None once decoded
        self.pending: list[Callable[[], torch.Tensor] | None] | None = None
        self.wait_s = self.decode_s = 0.0  # this step's downlink waits and decodes (wall)
        self.wait_cpu = self.decode_cpu = 0.0  # the same in this thread's CPU time
        self.posted = self.arrived = 0.0   # when the downlink was posted, when all of it was in
        self.overlap = None
        if cfg.overlap:
            self.overlap = OverlappedBackward(self)
            apply_before_use(self)

    # ---- one step ---------------------------------------------------------------------------
    def forward_loss(self) -> torch.Tensor:
        """The data loss on the next minibatch (training mode; gradients cleared)."""
        idx = self.sampler.next().to(self.device)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with self.task.randomness(self.dropout_gen):
            loss = self.task.loss_fn(self.model(self.x[idx]), self.y[idx])
        self.apply_pending()  # shards that no module read in this forward
        return loss

    def straggle(self, seconds: float) -> None:
        """``--slow-worker I=F``: after a backward that took ``seconds``, wait ``(F - 1)``
        times as long, so this worker computes F times slower in wall time."""
        if self.slow > 1.0:
            time.sleep((self.slow - 1.0) * seconds)

    def compute(self) -> tuple[torch.Tensor, float]:
        """Gradient of the data loss on the next minibatch, flattened; and the loss."""
        t0 = time.perf_counter()
        loss = self.forward_loss()
        loss.backward()
        self.straggle(time.perf_counter() - t0)
        g = common.flat_grads(self.model)
        self._inject(g)
        return g, float(loss.detach())

    def _inject(self, g: torch.Tensor) -> None:
        """``--inject-nonfinite``: coordinate 0 (shard 0) of this step's gradient is NaN."""
        if self.nonfinite_at == (self.index, self.step + 1):
            g[0] = float("nan")

    def encode(self, g: torch.Tensor, shard: int = 0) -> torch.Tensor:
        """The uplink payload of one shard of ``g`` as a flat uint8 tensor (a non-finite marker
        if that shard of ``g`` is): each shard has its own encoder and generator, so a bad
        shard leaves the others' payloads as they would have been."""
        lo, hi = self.bounds[shard]
        part = g if (lo, hi) == (0, g.numel()) else g[lo:hi]
        try:
            payload = self.comps[shard].encode(part, generator=self.gens[shard])
        except NonFiniteGradientError as err:
            payload = self.comps[shard].nonfinite_payload(hi - lo, err.count)
        data = payload.to_tensor()
        return data if data.device == self.device else data.to(self.device)

    def step_up(self, ship: Callable[[int, torch.Tensor], None] | None = None,
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Apply the pending downlink, compute and encode one step; ``ship(s, payload)`` is
        called with each shard's payload as soon as it is encoded (with ``--overlap``, during
        backward: see :mod:`dist_quant.ps.overlap`; else after it, in shard order).

        Returns (one uint8 payload per shard, telemetry float64 ``TELEMETRY``); ``decode`` is
        this worker's decoding of the previous step's downlink, ``overlap`` the seconds from
        the first shard's hand-over to the end of backward, ``overlap_down`` the seconds the
        previous step's downlink was in flight while this worker went on (from posting its
        receives to the arrival of its last shard, less the time the forward waited for it);
        both 0 without ``--overlap``. Waits for the downlink are not ``compute``.
        ``cpu_decode``, ``cpu_compute``, ``cpu_encode``: the same phases in this thread's CPU
        time (:mod:`dist_quant.runtime.phasetime`), charged to it; the payloads' sends
        (``ship``) are in none of them.
        """
        self.wait_s = self.decode_s = 0.0
        self.wait_cpu = self.decode_cpu = 0.0
        waiting = self.pending is not None and self.overlap is not None
        t0 = now()
        if self.overlap is None:
            self.apply_pending()
        t1 = now()
        if self.overlap is not None:
            g, loss, payload, encode, overlap_s = self.overlap.compute(ship)
            t2 = t3 = now()
            t2 -= encode
        else:
            g, loss = self.compute()
            t2 = now()
            payload = [self.encode(g, s) for s in range(len(self.bounds))]
            t3 = now()
            if ship is not None:
                for s, data in enumerate(payload):
                    ship(s, data)
            overlap_s = 0.0
        self.step += 1
        decode, compute, encode = t1 - t0, t2 - t1, t3 - t2
        if waiting:  # the downlink was decoded inside the forward: take it out of compute
            compute -= Clocks(self.wait_s + self.decode_s, self.wait_cpu + self.decode_cpu)
            decode = Clocks(self.decode_s, self.decode_cpu)
        charge(decode.cpu + compute.cpu + encode.cpu)
        overlap_down = max(0.0, self.arrived - self.posted - self.wait_s) if waiting else 0.0
        telemetry = torch.tensor([loss, decode.wall, compute.wall, encode.wall, overlap_s,
                                  overlap_down, decode.cpu, compute.cpu, encode.cpu],
                                 dtype=torch.float64, device=self.device)
        return payload, telemetry

    def receive_downlink(self, payloads: list[torch.Tensor | Callable[[], torch.Tensor]],
                         ) -> None:
        """Keep the downlink payloads (one per shard); they are decoded at the start of the
        next step (or before a checkpoint), so their decode time is billed to the worker, not
        to the link. A payload may be a function that waits for it to arrive and returns it
        (``--overlap``): the next forward then decodes each shard just before the first module
        that reads it (:func:`~dist_quant.ps.overlap.apply_before_use`), so it starts on the
        first layers while the other shards are still on the wire. Each shard's decode is the
        same whenever it runs, so the replica is the same bit for bit."""
        self.pending = [p if callable(p) else _ready(p) for p in payloads]
        self.posted = time.perf_counter()

    def apply_pending(self, shards: list[int] | None = None) -> None:
        """Decode the pending downlink of ``shards`` (default: all) into the replica."""
        if self.pending is None:
            return
        for s in range(len(self.bounds)) if shards is None else shards:
            get = self.pending[s]
            if get is None:
                continue
            t0 = now()
            payload = get()
            t1 = now()
            self.arrived = t1.wall
            self.pending[s] = None
            lo, hi = self.bounds[s]
            replica = self.replica if len(self.bounds) == 1 else self.replica[lo:hi]
            if self.cfg.downlink == "none" and payload is self.inbox:  # received in place
                self.down.check(payload)
            elif self.cfg.downlink == "none":  # the parameters themselves: into the replica
                self.down.decode(payload, out=replica)
            else:
                replica.add_(self.down.decode(payload, out=self.decoded[lo:hi]))
            wait, decode = t1 - t0, now() - t1
            self.wait_s += wait.wall
            self.wait_cpu += wait.cpu
            self.decode_s += decode.wall
            self.decode_cpu += decode.cpu
        if all(get is None for get in self.pending):
            self.pending = None
            self.params.load()

    def await_downlink(self) -> None:
        """Wait until every pending downlink payload has arrived, without decoding it (the
        end of a run: nothing may stay in flight)."""
        if self.pending is not None:
            self.pending = [None if get is None else _ready(get()) for get in self.pending]

    def bn_stats(self) -> torch.Tensor:
        return common.bn_stats(self.model)

    # ---- a lost worker's data --------------------------------------------------------------
    def take_over(self, lost: int) -> None:
        """Worker ``lost`` was dropped (``--min-workers``): this worker's training examples
        become its own and its share of the lost worker's (:func:`examples_after_losses`), and
        its batch order starts a new epoch over them."""
        self.lost.append(int(lost))
        epoch = self.sampler.epoch + 1
        self._load_examples()
        self.sampler.epoch = epoch

    def _load_examples(self) -> None:
        """The examples after the losses in ``self.lost``, and a batch sampler over them."""
        idx = examples_after_losses(len(self.task.data.y_train), self.cfg.workers, self.index,
                                    self.lost)
        self.x = self.task.data.x_train[idx].to(self.device)
        self.y = self.task.data.y_train[idx].to(self.device)
        self.sampler = worker_batches(len(self.y), self.cfg.batch_size, self.cfg.seed,
                                      self.index)

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (the replica is in ``model``)."""
        self.apply_pending()
        return {"index": self.index, "step": self.step,
                "model": {k: v.to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "generator": _one_or_list([g.get_state() for g in self.gens]),
                "dropout_generator": self.dropout_gen.get_state(),
                "sampler": self.sampler.state_dict(), "lost": list(self.lost),
                "compressor": _one_or_list([_on(c.state_dict(), torch.device("cpu"))
                                            if hasattr(c, "state_dict") else {}
                                            for c in self.comps])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["index"]) != self.index:
            raise ValueError(f"worker {self.index} was given the state of worker {state['index']}")
        self.step = int(state["step"])
        self.pending = None
        self.model.load_state_dict(state["model"])
        self.params.store()  # into the same replica buffer
        gens, comps = state["generator"], state["compressor"]
        if len(self.bounds) == 1:
            gens, comps = [gens], [comps]
        for g, st in zip(self.gens, gens, strict=True):
            g.set_state(st)
        self.dropout_gen.set_state(state["dropout_generator"])
        if state.get("lost"):
            self.lost = [int(j) for j in state["lost"]]
            self._load_examples()
        self.sampler.load_state_dict(state["sampler"])
        for c, st in zip(self.comps, comps, strict=True):
            if hasattr(c, "load_state_dict"):
                c.load_state_dict(_on(st, self.device))


def examples_after_losses(n: int, workers: int, index: int, lost: list[int]) -> torch.Tensor:
    """The indices of the training examples worker ``index`` trains on once the workers of
    ``lost`` were dropped, in that order.

    At the start worker i holds every W-th example from i (``Dataset.shard``). When worker j is
    dropped, the A workers left share what j held: the m-th of them (in index order) takes j's
    examples at positions m, m + A, m + 2A, ... of j's list, appended to its own. So every
    example stays with exactly one live worker, and every worker (and the replay) computes the
    same split from the same order of losses.
    """
    held = {i: torch.arange(i, n, workers) for i in range(workers)}
    gone: list[int] = []
    for j in lost:
        gone.append(j)
        alive = [i for i in range(workers) if i not in gone]
        theirs = held.pop(j)
        for m, i in enumerate(alive):
            held[i] = torch.cat([held[i], theirs[m::len(alive)]])
    if index not in held:
        raise ValueError(f"worker {index} was dropped: it holds no examples")
    return held[index]


def _ready(payload: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A payload that is already here, as :meth:`Worker.receive_downlink` keeps it."""
    return lambda: payload


def _one_or_list(items: list[Any]) -> Any:
    """A state of one shard as it is (the star's checkpoint format), of several as a list."""
    return items[0] if len(items) == 1 else items


def _on(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _on(v, device) for k, v in obj.items()}
    return obj


def replica_of(model: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """The flat parameters held in a worker state (``model.parameters()`` order)."""
    return torch.cat([state["model"][name].reshape(-1) for name, _ in model.named_parameters()])
