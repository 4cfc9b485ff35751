"""The synchronous step of the parameter-server job, written once for every topology.

A rank holds up to three pieces (:class:`~dist_quant.ps.state.RankState`): worker ``i``, the
server of shard ``s``, and, on the server of shard 0, the leader (evaluation, metrics,
checkpoints, the decision to go on). Which rank holds which piece is the
:class:`~dist_quant.ps.placement.Placement`; how bytes move is the fabric
(:mod:`dist_quant.ps.fabric`). One step is a fixed sequence of phases (``PHASES``); each
rank runs every phase, doing the part of its pieces:

1. ``up``: servers send the pieces of their parameters due at this step to the leader
   (evaluations in flight: :mod:`dist_quant.ps.evallag`); worker i computes its gradient,
   encodes it once per shard with that shard's generator and sends shard s's payload to
   server s (with ``--overlap`` during backward, as soon as the shard is complete:
   :mod:`dist_quant.ps.overlap`); telemetry (and, at evaluation steps, its BN running
   statistics) goes to the leader;
2. ``serve``: server s decodes and averages its W rows (a bad row is left out of this shard
   only), steps its shard with ``DecoupledMomentumSGD`` and encodes its shard's downlink; it
   reports to the leader (``STATUS``: rows left out, whether it could step, phase times,
   bytes) and, at evaluation steps, keeps a copy of its parameters for the evaluation (with
   ``--eval-lag 0`` it sends them now);
3. ``decide``: the leader evaluates the parameters of the evaluation due at this step with
   the BN statistics averaged at its step, and decides: continue, last step (``--steps``, or
   ``--stop-accuracy`` reached by that evaluation), or abort (``--on-nonfinite abort`` with a
   bad row, a shard without any valid row for ``STUCK_STEPS`` steps in a row, or a diverged
   loss); it tells every rank;
4. ``receive_control``: the other ranks receive that decision (abort ends them);
5. ``down_send`` / ``down_recv``: server s sends its shard's downlink to every worker (and,
   where the run ends or checkpoints, what is left of the evaluations in flight); every worker
   keeps the S payloads and applies them at the start of its next step (with ``--overlap``,
   each as the next forward first needs it);
6. ``record``: the leader writes the step's metrics (bytes per direction and per server),
   finishes the evaluations in flight if the run ends or checkpoints here, and writes the
   lines of the evaluations done at this step;
7. ``ckpt_send`` / ``ckpt_save``: at checkpoint steps every rank sends its pieces' states to
   the leader, which writes one file holding every shard's and every worker's state.

``--simulate`` runs each phase for every rank in one process over a
:class:`~dist_quant.ps.fabric.LocalFabric`, the leader last; a distributed rank runs the
phases for itself over a :class:`~dist_quant.ps.fabric.RemoteFabric` (both started by
:mod:`dist_quant.ps.start`). The arithmetic, the random streams and the order of every
operation on them are the same, so both end with the same parameters bit for bit.

Checkpoint: :mod:`dist_quant.ps.state`'s format 1 with ``"eval_stop": None or {"eval_step":
s, "at": s + L}``, a stop decided by the evaluation of step s, applied at step s + L (absent
from older checkpoints: none).

Phase times (``metrics.jsonl``): the slowest worker's ``compute``, ``encode``, ``decode``
plus the slowest server's decode, update and downlink encode (sums in the simulator);
``communicate`` is the rest of the leader's step. Evaluation and checkpoints are outside.
The step's ``cpu`` holds the same phases in thread CPU time (:mod:`dist_quant.runtime.phasetime`):
the largest worker's and server's figures (sums in the simulator, where each role's phase is
measured around that role's work), and for ``communicate`` the CPU of the leader's thread in
its step outside every phase measured on it (its own pieces' and, simulated, every role's).
An evaluation's own wall and CPU time go on its eval line.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.ps.evallag import LaggedEvaluation, PendingEval
from dist_quant.ps.fabric import TAG_CONTROL, TAG_DOWN, TAG_STATS, TAG_STATUS, TAG_TELEMETRY, TAG_UP
from dist_quant.ps.placement import Placement
from dist_quant.ps.protocol import (
    ABORT,
    CONTINUE,
    LAST,
    STATUS,
    TELEMETRY,
    cpu_phases,
    cpu_roles,
)
from dist_quant.ps.schedule import is_checkpoint_step, is_eval_step
from dist_quant.ps.server import STUCK_STEPS
from dist_quant.ps.state import RankState
from dist_quant.ps.task import Task
from dist_quant.ps.worker import RunAborted, replica_of
from dist_quant.runtime.phasetime import Window, charge, now

PHASES = ("up", "serve", "decide", "receive_control", "down_send", "down_recv", "record",
          "ckpt_send", "ckpt_save")


class SyncRank(LaggedEvaluation, RankState):
    """One rank's part of each phase of the synchronous step (module docstring)."""

    def __init__(self, cfg: TrainConfig, placement: Placement, rank: int, task: Task,
                 device: torch.device, fabric: Any):
        super().__init__(cfg, placement, rank, task, device, fabric)
        self.resumed_stop: tuple[int | None, int | None] = (None, None)

    # ---- 1. up ------------------------------------------------------------------------------
    def up(self) -> None:
        self.step += 1
        self.window = Window()
        self.with_stats = is_eval_step(self.cfg, self.step)
        if self.lag > 0:  # the evaluations' pieces due now travel beside this step's compute
            if self.shard is not None:
                self.send_pieces(settle=False)
            if self.is_leader:
                self.post_pieces(settle=False)
        if self.worker is None:
            self.fabric.flush_held()
            return
        telemetry = self.ship_gradient()
        self.fabric.flush_held()  # the previous downlink's sends (--overlap), before serve
        self.send_telemetry(telemetry, self.with_stats)

    # ---- 2. serve ---------------------------------------------------------------------------
    def serve(self) -> None:
        sh = self.shard
        if sh is None:
            return
        rows = self.fabric.gather(list(self.p.worker_ranks), self.rank, TAG_UP, sh.up_nbytes(),
                                  torch.uint8, "gradient payload", self.device)
        t1 = now()
        g, bad = sh.aggregate(rows)
        t2 = now()
        sh.update(g)
        t3 = now()
        self.down_payload = sh.downlink()
        t4 = now()
        decode, update, encode = t2 - t1, t3 - t2, t4 - t3
        charge(decode.cpu + update.cpu + encode.cpu)
        abort = self.judge_rows(bad)
        remote = self.p.remote_workers(sh.index)
        status = torch.tensor([float(v) for v in (
            len(bad), g is None, abort, decode.wall, update.wall, encode.wall,
            remote * rows.shape[1], remote * self.down_payload.numel(), decode.cpu, update.cpu,
            encode.cpu)], dtype=torch.float64)
        self.fabric.send(self.rank, self.p.leader, TAG_STATUS, status, "server status")
        if self.with_stats:  # a copy: theta moves on while its pieces travel
            self.outgoing.append([self.step, sh.theta.clone(), 0])
            if self.lag == 0:
                self.send_pieces(settle=True)

    # ---- 3. decide --------------------------------------------------------------------------
    def decide(self) -> None:
        """The leader: gather the step's reports, evaluate what is due, send the control."""
        if not self.is_leader:
            return
        p, f = self.p, self.fabric
        self.telemetry = f.gather(list(p.worker_ranks), self.rank, TAG_TELEMETRY,
                                  len(TELEMETRY), torch.float64, "telemetry", self.device).cpu()
        self.status = f.gather(list(p.server_ranks), self.rank, TAG_STATUS, len(STATUS),
                               torch.float64, "server status", self.device).cpu()
        stats = None
        if self.with_stats and self.n_stats:
            stats = f.gather(list(p.worker_ranks), self.rank, TAG_STATS, self.n_stats,
                             torch.float32, "BatchNorm statistics", self.device)
        self.stats_bytes = 0 if stats is None else 4 * self.n_stats * sum(
            r != self.rank for r in p.worker_ranks)
        self.t_eval = 0.0
        reason = ""
        for s in range(p.num_shards):
            self.stuck[s] = self.stuck[s] + 1 if self.status[s, 1] else 0
        if self.status[:, 2].any():
            reason = self.refused(self.step)
        elif max(self.stuck) >= STUCK_STEPS:
            reason = self.stuck_reason(max(range(p.num_shards), key=lambda k: self.stuck[k]),
                                       self.step, "steps")
        elif (diverged := self.monitor.observe(self.step,
                                               float(self.telemetry[:, 0].mean()))) is not None:
            reason = diverged
        te = now()
        if self.with_stats and not reason:
            self.pending.append(PendingEval(self.step, None if stats is None else stats.mean(0),
                                            torch.empty_like(self.theta)))
            if self.lag == 0:  # its servers sent it all in serve
                self.post_pieces(settle=True)
        if not reason:
            for e in [e for e in self.pending if e.step + self.lag == self.step]:
                self.evaluate(e)
        self.t_eval = (now() - te).wall
        last = self.step == self.cfg.steps or (self.stop_due is not None
                                               and self.step >= self.stop_due)
        self.control = ABORT if reason else LAST if last else CONTINUE
        for r in p.ranks:
            if r != self.rank:
                f.send(self.rank, r, TAG_CONTROL, torch.tensor([self.control]), "control")
        if reason:
            f.flush()
            raise RunAborted(reason)

    # ---- 4. control -------------------------------------------------------------------------
    def receive_control(self) -> None:
        if self.is_leader:
            return
        self.control = int(self.fabric.recv(self.p.leader, self.rank, TAG_CONTROL, "control", 1,
                                            torch.int64)[0])
        if self.control == ABORT:
            raise RunAborted(f"the leader ended the run at step {self.step} (see the message "
                             "of the rank that refused a payload, or the leader's)")

    # ---- 5. downlink ------------------------------------------------------------------------
    def down_send(self) -> None:
        """Server: its shard's downlink to every worker, then, where the step settles, every
        piece left of the evaluations in flight; the leader posts their receives after its own
        server's sends."""
        settle = self.settles()
        if self.shard is not None:
            for r in self.p.worker_ranks:
                self.fabric.send(self.rank, r, TAG_DOWN, self.down_payload, "parameters payload")
            if settle:
                self.send_pieces(settle=True)
        if self.is_leader and settle:
            self.post_pieces(settle=True)

    def down_recv(self) -> None:
        """Receive the downlink; with ``--overlap`` only post the receives, and hold the sends:
        the next step's forward waits for each shard when it needs it."""
        later = self.cfg.overlap
        if self.worker is not None:
            w, f = self.worker, self.fabric
            recv = f.recv_later if later else f.recv
            w.receive_downlink([recv(self.p.server_ranks[s], self.rank, TAG_DOWN,
                                     "parameters payload", box.numel(), torch.uint8, out=box)
                                for s, box in enumerate(w.inboxes)])
        if later:
            self.fabric.hold()
        else:
            self.fabric.flush()

    def drain(self) -> None:
        """The end of the run: nothing stays in flight."""
        if self.worker is not None:
            self.worker.await_downlink()
        self.fabric.flush()
        self.fabric.wait_aside()

    # ---- 6. record --------------------------------------------------------------------------
    def record(self) -> None:
        if not self.is_leader:
            return
        combine = torch.sum if self.sequential else torch.amax
        tel = combine(self.telemetry[:, 1:], dim=0).tolist()   # decode, compute, encode, overlap
        srv = combine(self.status[:, 3:6], dim=0).tolist()      # decode, update, encode
        times = {"compute": tel[1], "encode": tel[2] + srv[2], "decode": tel[0] + srv[0],
                 "update": srv[1]}
        wall = self.window.elapsed().wall - self.t_eval
        times["communicate"] = max(0.0, wall - sum(times.values()))
        workers, servers = (combine(self.telemetry, dim=0).tolist(),
                            combine(self.status, dim=0).tolist())
        cpu = cpu_phases(workers, servers, self.window.rest())
        ups = [int(b) for b in self.status[:, 6].tolist()]
        downs = [int(b) for b in self.status[:, 7].tolist()]
        rec = self.recorder.step(self.step, float(self.telemetry[:, 0].mean()),
                                 sum(ups) + self.stats_bytes, sum(downs), times,
                                 skipped=int(self.status[:, 0].sum()),
                                 extra={"servers": [{"bytes_up": u, "bytes_down": d,
                                                     "skipped": int(k)}
                                                    for u, d, k in zip(
                                                        ups, downs, self.status[:, 0].tolist(),
                                                        strict=True)],
                                        "bytes_stats": self.stats_bytes,
                                        "time_overlap": tel[3],
                                        "time_overlap_down": tel[4],
                                        "cpu_roles": cpu_roles(workers, servers)}, cpu=cpu)
        for e in self.pending + self.evaluated:
            if e.step == self.step:
                e.wall, e.cum = rec["wall"], (rec["cum_bytes_up"], rec["cum_bytes_down"])
                e.train_loss = rec["loss"]
        if self.settles():
            for e in list(self.pending):
                self.evaluate(e)
        # the progress line of an evaluation names its own step, loss and bytes
        for e in sorted(self.evaluated, key=lambda e: e.step):
            self.recorder.eval(e.step, e.loss, e.accuracy, wall=e.wall, cum=e.cum,
                               extra={"evaluated_at": e.evaluated_at}, spent=e.spent)
            self.progress.update(e.step, e.train_loss, e.accuracy, *e.cum)
        if all(e.step != self.step for e in self.evaluated):
            self.progress.update(self.step, rec["loss"], self.test_acc, self.recorder.cum_up,
                                 self.recorder.cum_down)
        self.evaluated = []

    # ---- 7. checkpoints ---------------------------------------------------------------------
    def checkpoint_now(self) -> bool:
        """Whether this step writes a checkpoint (every ``--checkpoint-every``, and the last)."""
        return is_checkpoint_step(self.cfg, self.step, last=self.control == LAST)

    def ckpt_send(self) -> None:
        if self.checkpoint_now() and not self.is_leader:
            self.fabric.send_blob(self.rank, self.p.leader, self.own_state(), "rank state")

    def ckpt_save(self) -> None:
        if not (self.checkpoint_now() and self.is_leader):
            return
        states = {r: (self.own_state() if r == self.rank else
                      self.fabric.recv_blob(r, self.rank, "rank state")) for r in self.p.ranks}
        stop = None if self.stop_due is None else {"eval_step": self.stop_eval,
                                                    "at": self.stop_due}
        self.write_checkpoint(self.step, states, {"eval_stop": stop})

    def check_replicas(self, shards: list[dict], workers: list[dict | None]) -> None:
        """Every worker's replica equals the concatenation of the servers' tracked copies."""
        replica = torch.cat([s["replica"] for s in shards])
        for i, state in enumerate(workers):
            if not torch.equal(replica_of(self.model, state), replica):
                raise RuntimeError(f"worker {i}'s replica differs from the servers' tracked copy")

    # ---- start and end ----------------------------------------------------------------------
    def hand_out(self) -> None:
        """The leader of a resumed run hands every rank its pieces' states."""
        state = self.hand_out_resume()
        if state is not None and (stop := state.get("eval_stop")) is not None:
            self.resumed_stop = (int(stop["at"]), int(stop["eval_step"]))  # not yet applied

    def take_resumed(self) -> None:
        if not self.cfg.resume:
            return
        mine = self.resumed_pieces()
        if self.worker is not None:
            self.worker.load_state_dict(mine["worker"])
            self.step = self.worker.step
        if self.shard is not None:
            self.shard.load_state_dict(mine["shard"])
            self.step = self.shard.step

    def open_records(self, sequential: bool) -> None:
        super().open_records(sequential)
        self.open_evaluations(self.resumed_stop)

    def close_records(self, **extra: Any) -> dict[str, Any] | None:
        if not self.is_leader:
            return None
        return super().close_records(
            eval_lag=self.cfg.eval_lag, test_step=self.test_step,
            stop_eval_step=self.stop_eval if self.step < self.cfg.steps else None, **extra)


def _phase(ranks: list[SyncRank], name: str) -> None:
    for r in ranks:
        getattr(r, name)()


def run_sync(cfg: TrainConfig, ranks: list[SyncRank], sequential: bool) -> dict[str, Any] | None:
    """Run ``ranks`` (every rank of the job in this process, the leader last, when
    ``sequential``; else this process's one rank) to the end; the leader's summary."""
    for name in ("hand_out", "take_resumed"):
        _phase(ranks, name)
    for r in ranks:
        r.open_records(sequential)
    try:
        while ranks[0].step < cfg.steps and ranks[0].control != LAST:
            for name in PHASES:
                _phase(ranks, name)
        _phase(ranks, "drain")
    finally:
        for r in ranks:
            if r.is_leader:
                r.progress.close()
    return next((r.close_records() for r in ranks if r.is_leader), None)
