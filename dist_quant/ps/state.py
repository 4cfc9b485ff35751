"""What one rank of the parameter-server job keeps, whichever step drives it.

A rank holds up to three pieces, placed by :class:`~dist_quant.ps.placement.Placement`:
worker ``i`` (:class:`~dist_quant.ps.worker.Worker`: its replica, sampler, generators,
compressor state), the server of shard ``s`` (:class:`~dist_quant.ps.shard.ShardServer`:
``theta_s``, its momentum, the replica its downlink tracks) and, on the server of shard 0, the
leader: a model whose parameters are views of one flat vector ``theta`` (every shard, gathered
for evaluations and checkpoints), the test split, per shard the count of consecutive updates
without a valid row, the divergence monitor and the run's records. :class:`RankState` holds
them and what both steps do with them alike: send a gradient, judge the rows a shard left out,
write and read checkpoints, open and close the records. The synchronous step
(:mod:`dist_quant.ps.sync_step`) and the asynchronous step (:mod:`dist_quant.ps.async_rank`)
build on it; :mod:`dist_quant.ps.start` picks one.

Bad rows. A row that is marked non-finite or fails validation is left out of its shard's
mean (``--on-nonfinite skip``: the first ``SKIP_LINES`` updates with such rows are printed, all
are counted) or asks the leader to end the run (``abort``, with the reason of the server that
refused it). A shard without any valid row keeps its parameters; ``STUCK_STEPS`` such updates
in a row end the run (:mod:`dist_quant.ps.server`).

Checkpoint (format 1)::

    {"format": 1, "step": t, "config": cfg.to_dict(),
     "server": {"model": the leader's model (theta of every shard, BN statistics of the last
                evaluation), **state of shard 0},
     "shards": [states of shards 1..S-1], "workers": [worker states, None for a lost one],
     **the step's own entries}

Shard states are :meth:`~dist_quant.ps.shard.ShardServer.state_dict`, worker states
:meth:`~dist_quant.ps.worker.Worker.state_dict`. The synchronous step adds ``eval_stop``, the
asynchronous step ``consistency`` (the leader's arrival state) and, per shard, its received
but unapplied payloads and its replica groups. Every worker's replica is checked against the
copy its servers track before the file is written. On ``--resume`` the leader reads the latest
checkpoint and hands every rank its pieces' states (:meth:`RankState.hand_out_resume`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from dist_quant.compress import get_compressor
from dist_quant.config import TrainConfig
from dist_quant.core.transport import CONTINUE
from dist_quant.ps import common
from dist_quant.ps.fabric import TAG_STATS, TAG_TELEMETRY, TAG_UP
from dist_quant.ps.placement import Placement
from dist_quant.ps.server import SKIP_LINES
from dist_quant.ps.shard import ShardServer
from dist_quant.ps.task import Task
from dist_quant.ps.worker import RunAborted, Worker
from dist_quant.runtime.checkpoint import load_for_resume, save_checkpoint
from dist_quant.runtime.divergence import DivergenceMonitor
from dist_quant.runtime.metrics import RunRecorder, read_metrics
from dist_quant.runtime.progress import Progress, summary_line


class RankState:
    """The pieces one rank holds (module docstring) and what both steps do with them."""

    def __init__(self, cfg: TrainConfig, placement: Placement, rank: int, task: Task,
                 device: torch.device, fabric: Any):
        self.cfg, self.p, self.rank, self.fabric = cfg, placement, int(rank), fabric
        self.device, self.task = torch.device(device), task
        self.model = task.model(self.device)
        data = task.data
        self.n = common.num_params(self.model)
        self.n_stats = common.bn_stats(self.model).numel()
        w, s = placement.worker_of(rank), placement.shard_of(rank)
        self.worker = None if w is None else Worker(cfg, task, w, self.device,
                                                    list(placement.bounds))
        self.shard = None if s is None else ShardServer(cfg, self.model, *placement.bounds[s],
                                                        s, self.device)
        self.is_leader = rank == placement.leader
        self.step = 0
        self.control = CONTINUE
        self.printed = 0          # updates whose left-out rows this server printed
        self.abort_reason = ""    # why this server asks the leader to abort, if it does
        self.resumed: dict[str, Any] | None = None   # the leader's own pieces' resumed states
        if self.is_leader:
            self.theta = common.flat_params(self.model)
            self.params = common.ParamViews(self.model, self.theta, alias=True)
            self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
            self.stuck = [0] * placement.num_shards
            self.num_classes = data.num_classes
            self.monitor = DivergenceMonitor(cfg)

    # ---- a worker's gradient ----------------------------------------------------------------
    def ship_gradient(self) -> torch.Tensor:
        """Compute and encode this worker's gradient, sending each shard's payload to its
        server as soon as it is encoded; the telemetry (``TELEMETRY``)."""
        def ship(s: int, payload: torch.Tensor) -> None:
            self.fabric.send(self.rank, self.p.server_ranks[s], TAG_UP, payload,
                             "gradient payload")

        _, telemetry = self.worker.step_up(ship)
        return telemetry

    def send_telemetry(self, telemetry: torch.Tensor, stats: bool) -> None:
        """The gradient's telemetry to the leader, and (``stats``) the BatchNorm statistics."""
        self.fabric.send(self.rank, self.p.leader, TAG_TELEMETRY, telemetry, "telemetry")
        if stats and self.n_stats:
            self.fabric.send(self.rank, self.p.leader, TAG_STATS, self.worker.bn_stats(),
                             "BatchNorm statistics")

    # ---- a server's bad rows ----------------------------------------------------------------
    def where(self) -> str:
        """``step t`` (the star) or ``step t: shard s``."""
        one = self.p.num_shards == 1
        return f"step {self.step}" + ("" if one else f": shard {self.shard.index}")

    def judge_rows(self, bad: list[str]) -> bool:
        """The rows an update of this shard left out (``bad``: why, one per row): whether they
        ask for an abort (its reason is kept in ``abort_reason``); printed as the module
        docstring says."""
        abort = bool(bad) and self.cfg.on_nonfinite == "abort"
        if bad:
            self._report_bad(bad, abort)
        self.abort_reason = f"{self.where()}: {'; '.join(bad)} (--on-nonfinite abort)" \
            if abort else ""
        return abort

    def _report_bad(self, bad: list[str], abort: bool) -> None:
        """Print why rows were left out: one line for each of the first ``SKIP_LINES`` updates
        with bad rows; an abort's reason (the leader ends the run with it when it is here)."""
        where = self.where()
        if abort:
            if not self.is_leader:
                print(f"{where}: {'; '.join(bad)} (--on-nonfinite abort)", file=sys.stderr,
                      flush=True)
        elif self.printed < SKIP_LINES:
            more = " (from now on only counted in metrics.jsonl)" \
                if self.printed == SKIP_LINES - 1 else ""
            print(f"{where}: left out {len(bad)} of {self.cfg.workers} payloads: "
                  f"{'; '.join(bad)}{more}", file=sys.stderr, flush=True)
        self.printed += 1

    def refused(self, step: int) -> str:
        """The leader's reason to abort when a server refused a payload."""
        return self.abort_reason or f"step {step}: a payload was refused (--on-nonfinite abort)"

    def stuck_reason(self, shard: int, step: int, unit: str) -> str:
        """The leader's reason to abort once ``shard`` had no valid row for ``STUCK_STEPS``
        ``unit`` (steps or updates) in a row."""
        which = "" if self.p.num_shards == 1 else f" for shard {shard}"
        return (f"no valid payload{which} for {self.stuck[shard]} consecutive {unit} "
                f"(up to step {step}): training diverged; lower --lr")

    # ---- checkpoints and resume -------------------------------------------------------------
    def own_state(self) -> dict[str, Any]:
        """This rank's pieces' states, as the leader collects them for a checkpoint."""
        return {"worker": None if self.worker is None else self.worker.state_dict(),
                "shard": None if self.shard is None else self.shard.state_dict()}

    def check_replicas(self, shards: list[dict], workers: list[dict | None]) -> None:
        """Raise if a worker's replica differs from what its servers track (per step)."""
        raise NotImplementedError

    def write_checkpoint(self, step: int, states: dict[int, dict[str, Any]],
                         extra: dict[str, Any]) -> None:
        """The leader: one checkpoint file of every rank's ``states`` (by rank; a lost
        worker's rank absent) and the step's ``extra`` entries (module docstring)."""
        p = self.p
        shards = [states[p.server_ranks[s]]["shard"] for s in range(p.num_shards)]
        workers = [states[r]["worker"] if r in states else None for r in p.worker_ranks]
        self.check_replicas(shards, workers)
        with torch.no_grad():
            self.theta.copy_(torch.cat([s["theta"] for s in shards]).to(self.device))
        model = {k: v.to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        save_checkpoint(self.cfg.run_dir, step, {
            "format": 1, "step": step, "config": self.cfg.to_dict(),
            "server": {"model": model, **shards[0]}, "shards": shards[1:], "workers": workers,
            **extra}, keep=self.cfg.keep_checkpoints)

    def hand_out_resume(self) -> dict[str, Any] | None:
        """The leader of a resumed run: read the latest checkpoint, load its model and hand
        every rank its pieces' states; the checkpoint (None on the other ranks)."""
        if not (self.cfg.resume and self.is_leader):
            return None
        state = load_for_resume(self.cfg)
        self.model.load_state_dict(state["server"]["model"])
        shards = [state["server"], *state["shards"]]
        for r in self.p.ranks:
            w, s = self.p.worker_of(r), self.p.shard_of(r)
            mine = {"worker": None if w is None else state["workers"][w],
                    "shard": None if s is None else shards[s]}
            if r == self.rank:
                self.resumed = mine
            else:
                self.fabric.send_blob(self.rank, r, mine, "resume state")
        return state

    def resumed_pieces(self) -> dict[str, Any]:
        """This rank's pieces' states handed out by :meth:`hand_out_resume`."""
        return self.resumed if self.is_leader else self.fabric.recv_blob(
            self.p.leader, self.rank, "resume state")

    # ---- records ----------------------------------------------------------------------------
    def open_records(self, sequential: bool) -> None:
        """The leader opens the run's records (appending to them on resume); ``sequential``:
        every rank runs in this process (phase times are then sums, not maxima)."""
        self.sequential = sequential
        if not self.is_leader:
            return
        self.recorder = RunRecorder(self.cfg.run_dir, self.task.recorded_config(self.cfg),
                                    resume_step=self.step if self.cfg.resume else None,
                                    model=self.task.kind, metric=self.task.metric_name,
                                    data=self.task.data.info)
        self.evals = sum(1 for r in read_metrics(self.cfg.run_dir) if r["kind"] == "eval")
        self.progress = Progress(self.cfg.steps, enabled=self.cfg.progress)
        self.test_loss = self.test_acc = float("nan")

    def close_records(self, **extra: Any) -> dict[str, Any] | None:
        """The summary (``extra`` adds or replaces fields), written and printed by the leader."""
        if not self.is_leader:
            return None
        p, cfg = self.p, self.cfg
        if (diverged := self.monitor.final(self.test_loss, self.test_acc,
                                           self.num_classes)) is not None:
            self.recorder.close()
            raise RunAborted(diverged)

        fp32 = get_compressor("none")
        per_step = sum(p.remote_workers(s) * fp32.payload_nbytes(hi - lo)
                       for s, (lo, hi) in enumerate(p.bounds))
        stats = 4 * self.n_stats * sum(r != self.rank for r in p.worker_ranks)
        sh = self.shard
        summary = self.recorder.summary(**{**dict(
            test_accuracy=self.test_acc, test_loss=self.test_loss,
            fp32_bytes_up=self.step * per_step + self.evals * stats,
            fp32_bytes_down=self.step * per_step, steps=self.step, workers=cfg.workers,
            params=self.n, compressor=cfg.compressor, method=cfg.method,
            bucket_size=cfg.bucket_size, downlink=cfg.downlink,
            payload_nbytes_up=sum(sh.up.payload_nbytes(hi - lo) for lo, hi in p.bounds),
            payload_nbytes_down=sum(sh.down.payload_nbytes(hi - lo) for lo, hi in p.bounds),
            servers=p.num_shards, colocate=cfg.colocate, shard_sizes=[hi - lo for lo, hi
                                                                      in p.bounds],
            simulate=cfg.simulate, stopped_early=self.step < cfg.steps,
            consistency=cfg.consistency,
            **({"stop_loss": cfg.stop_loss} if cfg.stop_loss else {})), **extra})
        self.recorder.close()
        print(summary_line(summary), flush=True)
        return summary
