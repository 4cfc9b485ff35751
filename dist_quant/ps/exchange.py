"""The synchronous step of the parameter-server job, written once for every topology.

A rank holds up to three pieces (:class:`RankRoles`): worker ``i``
(:class:`~dist_quant.ps.worker.Worker`), the server of shard ``s``
(:class:`~dist_quant.ps.shard.ShardServer`), and, on the server of shard 0, the leader
(evaluation, metrics, checkpoints, the decision to go on). Which rank holds which piece is the
:class:`~dist_quant.ps.placement.Placement`; how bytes move is the fabric
(:mod:`dist_quant.ps.fabric`). One step is a fixed sequence of phases (``PHASES``); each
rank runs every phase, doing the part of its pieces:

1. ``up``: servers send the pieces of their parameters due at this step to the leader
   (evaluations in flight, see below); worker i computes its gradient, encodes it once per
   shard with that shard's generator and sends shard s's payload to server s (with
   ``--overlap`` during backward, as soon as the shard is complete:
   :mod:`dist_quant.ps.overlap`); telemetry (and, at evaluation steps, its BN running
   statistics) goes to the leader;
2. ``serve``: server s decodes and averages its W rows (a bad row is left out of this shard
   only), steps its shard with ``DecoupledMomentumSGD`` and encodes its shard's downlink; it
   reports to the leader (rows left out, whether it could step, phase times, bytes) and, at
   evaluation steps, keeps a copy of its parameters for the evaluation (with
   ``--eval-lag 0`` it sends them now);
3. ``lead``: the leader evaluates the parameters of the evaluation due at this step (see
   below) with the BN statistics averaged at its step, and decides: continue, last step
   (``--steps``, or ``--stop-accuracy`` reached by that evaluation), or abort
   (``--on-nonfinite abort`` with a bad row, or a shard without any valid row for
   ``STUCK_STEPS`` steps in a row); it tells every rank;
4. ``control``: the other ranks receive that decision (abort ends them);
5. ``down_send`` / ``down_recv``: server s sends its shard's downlink to every worker (and,
   where the run ends or checkpoints, what is left of the evaluations in flight); every worker
   keeps the S payloads and applies them at the start of its next step (with ``--overlap``,
   each as the next forward first needs it);
6. ``record``: the leader writes the step's metrics (bytes per direction and per server),
   finishes the evaluations in flight if the run ends or checkpoints here, and writes the
   lines of the evaluations done at this step;
7. ``ckpt_send`` / ``ckpt_save``: at checkpoint steps every rank sends its pieces' states to
   the leader, which writes one file holding every shard's and every worker's state.

Evaluation off the critical path (``--eval-lag L``, default ``EVAL_LAG`` = 8). At an evaluation
step s the workers send their BN running statistics with the step's telemetry (``4 k`` bytes
each, counted as uplink: small, so they do not lag) and every server copies its shard
``theta_s``. The copy travels to the leader in L contiguous pieces of near-equal size, piece j
(j = 0..L-1) at the start of step s + 1 + j, before that step's compute, as a send that no step
waits for (:meth:`~dist_quant.ps.fabric.RemoteFabric.send_aside`); the leader posts their
receives as they are sent and, in ``lead`` of step s + L, waits for the last one (sent at the
start of that step) and evaluates. The evaluation is of the parameters after step s's update
with the statistics of step s: the same numbers as evaluating at step s. If its accuracy
reaches ``--stop-accuracy``, the control of step s + L is LAST: the run stops at s + L, L steps
later than with ``--eval-lag 0`` (the parameters up to there are the same: evaluation changes
no training state). Its evaluation line keeps step s, with the wall time and cumulative bytes
of step s (the time to target counts to step s, as before) and ``evaluated_at`` s + L;
``summary.json`` says which evaluation stopped the run (``stop_eval_step``) and which step
``test_accuracy`` measures (``test_step``). The last step (``--steps``) and every checkpoint
step finish the evaluations in flight after their control (all pieces left, then evaluate), so
a run that goes to ``--steps`` ends with its final parameters evaluated (one stopped at s + L
reports the evaluation of step s: ``test_step``), and a checkpoint holds no evaluation in
flight: a stop already decided but not yet applied is saved with it (``eval_stop``) and a
resumed run applies it at the same step. ``--eval-lag 0`` is the previous behaviour: the
servers send the whole shard in ``serve`` and the leader evaluates before the control of step
s, while every rank waits.

Why 8. Gloo sends the messages between two ranks in order over one connection, so a piece
still on the wire holds back whatever its server sends the leader next (the next step's
uplink payload of shard 0, the server's downlink to the leader's worker): a piece is hidden
only in the time the leader's link would be idle anyway, which in a colocated step is mostly
its compute (the exchange itself keeps the link busy): hence a piece goes at the start of a
step, once the previous step's downlinks are in (sent right after a downlink, one server's
piece got ahead of another server's downlink in the leader's link queue, and the steps after
an evaluation were measured slower). For ``ps-fast`` (W = 4, the MLP's 47,242 parameters,
10 Mbit/s links) the leader receives three shards of about 11.8k floats, 142 KB: 113 ms of its
link, against 12-25 ms of compute a step in the runs measured. In one piece (L = 1) or two, a
piece overruns its step's compute by most of its length and the step waits for it as it did
for the whole gather; in 8, a piece is 14 ms of link. Measured on the namespace cluster
(``benchmarks/evallag-2026-12-06``), an evaluation cost the steps s..s+8 124-159 ms with
L = 0, about 93 ms with 1 or 2, 52 ms with 4, 14-42 ms with 8 and 23 ms with 16: 8 is where it
stops paying. The lag costs no time to target; a run that stops takes L more steps (about
0.4 s here). The star's server is the leader: its pieces never leave the process, and the
lag only moves the decision. The asynchronous modes (:mod:`dist_quant.ps.events`) and the
DDP baselines keep evaluating at step s (``--eval-lag`` does not apply to them).

``--simulate`` (:func:`run_all`) runs each phase for every rank in one process over a
:class:`~dist_quant.ps.fabric.LocalFabric`; a distributed rank (:func:`run_rank`) runs the
phases for itself over a :class:`~dist_quant.ps.fabric.RemoteFabric`. The arithmetic, the
random streams and the order of every operation on them are the same, so both end with the
same parameters bit for bit.

Checkpoint (format 1): ``{"step", "config", "server": {"model": the leader's model (theta of
every shard, BN statistics of the last evaluation), **state of shard 0}, "shards": [states of
shards 1..S-1], "workers": [worker states], "eval_stop": None or {"eval_step": s, "at": s +
L}}``; shard states are :meth:`ShardServer.state_dict`; ``eval_stop`` is a stop decided by the
evaluation of step s, applied at step s + L (absent from older checkpoints: none).

Phase times (``metrics.jsonl``): the slowest worker's ``compute``, ``encode``, ``decode``
plus the slowest server's decode, update and downlink encode (sums in the simulator);
``communicate`` is the rest of the leader's step. Evaluation and checkpoints are outside.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_quant.config import TrainConfig
from dist_quant.core.transport import ABORT, CONTINUE, LAST
from dist_quant.ps import common
from dist_quant.ps.fabric import (
    TAG_CONTROL,
    TAG_DOWN,
    TAG_STATS,
    TAG_STATUS,
    TAG_TELEMETRY,
    TAG_THETA,
    TAG_UP,
    LocalFabric,
)
from dist_quant.ps.placement import Placement
from dist_quant.ps.schedule import (
    eval_pieces,
    is_checkpoint_step,
    is_eval_step,
    pieces_upto,
)
from dist_quant.ps.server import SKIP_LINES, STUCK_STEPS, evaluate_model
from dist_quant.ps.shard import ShardServer
from dist_quant.ps.task import Task
from dist_quant.ps.worker import TELEMETRY, RunAborted, Worker, replica_of
from dist_quant.runtime.divergence import DivergenceMonitor
from dist_quant.runtime.metrics import RunRecorder, read_metrics
from dist_quant.runtime.progress import Progress, summary_line

# server -> leader, per step: rows left out, could not step (0/1), abort requested (0/1),
# decode s, update s, encode s, bytes received over links, bytes to send over links
STATUS = ("left_out", "stuck", "abort", "decode", "update", "encode", "bytes_up", "bytes_down")


@dataclass
class PendingEval:
    """The leader's evaluation of step ``step``: the workers' averaged BN statistics (taken at
    that step), the parameters being gathered into ``theta`` (``sent`` pieces of each shard
    posted, ``waits`` their receives), and, once the step is recorded, its ``wall`` and
    cumulative bytes, which the evaluation line carries."""

    step: int
    stats: torch.Tensor | None
    theta: torch.Tensor
    sent: int = 0
    waits: list = field(default_factory=list)
    wall: float = float("nan")
    cum: tuple[int, int] = (0, 0)
    evaluated_at: int = 0
    train_loss: float = float("nan")
    loss: float = float("nan")
    accuracy: float = float("nan")


PHASES = ("up", "serve", "lead", "control", "down_send", "down_recv", "record", "ckpt_send",
          "ckpt_save")


class RankRoles:
    """The pieces one rank holds, and its part of each phase of the step."""

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
        self.lag = cfg.eval_lag
        self.resumed_stop: tuple[int | None, int | None] = (None, None)
        self.outgoing: list[list[Any]] = []  # server: [step s, its shard at s, pieces sent]
        self.step = 0
        self.control = CONTINUE
        self.printed = 0          # steps whose left-out rows this server printed
        self.abort_reason = ""    # why this server asks the leader to abort, if it does
        if self.is_leader:
            self.theta = common.flat_params(self.model)
            self.params = common.ParamViews(self.model, self.theta, alias=True)
            self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
            self.stuck = [0] * placement.num_shards
            self.num_classes = data.num_classes
            self.monitor = DivergenceMonitor(cfg)

    # ---- 1. up ---------------------------------------------------------------------------
    def up(self) -> None:
        self.step += 1
        self.t0 = time.perf_counter()
        self.with_stats = is_eval_step(self.cfg, self.step)
        if self.lag > 0:  # the evaluations' pieces due now travel beside this step's compute
            if self.shard is not None:
                self._send_pieces(settle=False)
            if self.is_leader:
                self._post_pieces(settle=False)
        if self.worker is None:
            self.fabric.flush_held()
            return
        def ship(s: int, payload: torch.Tensor) -> None:
            self.fabric.send(self.rank, self.p.server_ranks[s], TAG_UP, payload,
                             "gradient payload")

        _, telemetry = self.worker.step_up(ship)
        self.fabric.flush_held()  # the previous downlink's sends (--overlap), before serve
        self.fabric.send(self.rank, self.p.leader, TAG_TELEMETRY, telemetry, "telemetry")
        if self.with_stats and self.n_stats:
            self.fabric.send(self.rank, self.p.leader, TAG_STATS, self.worker.bn_stats(),
                             "BatchNorm statistics")

    # ---- 2. serve ------------------------------------------------------------------------
    def serve(self) -> None:
        sh = self.shard
        if sh is None:
            return
        rows = self.fabric.gather(list(self.p.worker_ranks), self.rank, TAG_UP, sh.up_nbytes(),
                                  torch.uint8, "gradient payload", self.device)
        t1 = time.perf_counter()
        g, bad = sh.aggregate(rows)
        t2 = time.perf_counter()
        sh.update(g)
        t3 = time.perf_counter()
        self.down_payload = sh.downlink()
        t4 = time.perf_counter()
        abort = bool(bad) and self.cfg.on_nonfinite == "abort"
        if bad:
            self._report_bad(bad, abort)
        self.abort_reason = f"{self._where()}: {'; '.join(bad)} (--on-nonfinite abort)" \
            if abort else ""
        remote = self.p.remote_workers(sh.index)
        status = torch.tensor([float(v) for v in (
            len(bad), g is None, abort, t2 - t1, t3 - t2, t4 - t3, remote * rows.shape[1],
            remote * self.down_payload.numel())],
                              dtype=torch.float64)
        self.fabric.send(self.rank, self.p.leader, TAG_STATUS, status, "server status")
        if self.with_stats:  # a copy: theta moves on while its pieces travel
            self.outgoing.append([self.step, sh.theta.clone(), 0])
            if self.lag == 0:
                self._send_pieces(settle=True)

    def _send_pieces(self, settle: bool) -> None:
        """Server: send the pieces of its shard that are due at the start of this step, for
        each evaluation in flight (oldest first; ``settle``: all that are left)."""
        pieces = eval_pieces(self.shard.n, self.lag)
        for entry in self.outgoing:
            s, theta, sent = entry
            entry[2] = pieces_upto(self.lag, s, self.step, settle)
            for lo, hi in pieces[sent:entry[2]]:
                if hi > lo:
                    self.fabric.send_aside(self.rank, self.p.leader, TAG_THETA, theta[lo:hi],
                                           "parameters for evaluation")
        self.outgoing = [e for e in self.outgoing if e[2] < len(pieces)]

    def _where(self) -> str:
        """``step t`` (the star) or ``step t: shard s``."""
        one = self.p.num_shards == 1
        return f"step {self.step}" + ("" if one else f": shard {self.shard.index}")

    def _report_bad(self, bad: list[str], abort: bool) -> None:
        """Print why rows were left out: one line for each of the first ``SKIP_LINES`` steps
        with bad rows; an abort's reason (the leader ends the run with it when it is here)."""
        where = self._where()
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

    # ---- 3. lead -------------------------------------------------------------------------
    def lead(self) -> None:
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
            reason = self.abort_reason or (
                f"step {self.step}: a payload was refused (--on-nonfinite abort)")
        elif max(self.stuck) >= STUCK_STEPS:
            s = max(range(p.num_shards), key=lambda k: self.stuck[k])
            which = "" if p.num_shards == 1 else f" for shard {s}"
            reason = (f"no valid payload{which} for {self.stuck[s]} consecutive steps "
                      f"(up to step {self.step}): training diverged; lower --lr")
        elif (diverged := self.monitor.observe(self.step,
                                               float(self.telemetry[:, 0].mean()))) is not None:
            reason = diverged
        te = time.perf_counter()
        if self.with_stats and not reason:
            self.pending.append(PendingEval(self.step, None if stats is None else stats.mean(0),
                                            torch.empty_like(self.theta)))
            if self.lag == 0:  # its servers sent it all in serve
                self._post_pieces(settle=True)
        if not reason:
            for e in [e for e in self.pending if e.step + self.lag == self.step]:
                self._evaluate(e)
        self.t_eval = time.perf_counter() - te
        last = self.step == self.cfg.steps or (self.stop_due is not None
                                               and self.step >= self.stop_due)
        self.control = ABORT if reason else LAST if last else CONTINUE
        for r in p.ranks:
            if r != self.rank:
                f.send(self.rank, r, TAG_CONTROL, torch.tensor([self.control]), "control")
        if reason:
            f.flush()
            raise RunAborted(reason)

    def _post_pieces(self, settle: bool) -> None:
        """Leader: post the receives of the pieces its servers send at the start of this step
        (``settle``: all that are left), in the order they send them (per server: evaluation by
        evaluation, piece by piece)."""
        p = self.p
        for e in self.pending:
            upto = pieces_upto(self.lag, e.step, self.step, settle)
            for j in range(e.sent, upto):
                for s, (lo, hi) in enumerate(p.bounds):
                    a, b = eval_pieces(hi - lo, self.lag)[j]
                    if b > a:
                        e.waits.append(self.fabric.recv_later(
                            p.server_ranks[s], self.rank, TAG_THETA,
                            "parameters for evaluation", b - a, torch.float32,
                            out=e.theta[lo + a:lo + b]))
            e.sent = upto

    def _evaluate(self, e: PendingEval) -> None:
        """Leader: wait for the rest of ``e``'s parameters and evaluate them; an accuracy at
        ``--stop-accuracy`` makes step ``e.step + lag`` the last."""
        for wait in e.waits:
            wait()
        with torch.no_grad():
            self.theta.copy_(e.theta)
        e.loss, e.accuracy = evaluate_model(self.model, self.x_test, self.y_test, e.stats,
                                            self.task.loss_fn, self.task.metric)
        e.evaluated_at = self.step
        self.test_loss, self.test_acc, self.test_step = e.loss, e.accuracy, e.step
        self.evals += 1
        if self.stop_due is None and 0 < self.cfg.stop_accuracy <= e.accuracy:
            self.stop_due, self.stop_eval = e.step + self.lag, e.step
        self.pending.remove(e)
        self.finished.append(e)

    def _settles(self) -> bool:
        """Whether this step finishes every evaluation in flight (after its control): the run
        ends here or a checkpoint is taken, which holds no evaluation in flight."""
        return self.lag > 0 and self._checkpoint_now()

    # ---- 4. control ----------------------------------------------------------------------
    def receive_control(self) -> None:
        if self.is_leader:
            return
        self.control = int(self.fabric.recv(self.p.leader, self.rank, TAG_CONTROL, "control", 1,
                                            torch.int64)[0])
        if self.control == ABORT:
            raise RunAborted(f"the leader ended the run at step {self.step} (see the message "
                             "of the rank that refused a payload, or the leader's)")

    # ---- 5. downlink ---------------------------------------------------------------------
    def down_send(self) -> None:
        """Server: its shard's downlink to every worker, then, where the step settles, every
        piece left of the evaluations in flight; the leader posts their receives after its own
        server's sends."""
        settle = self._settles()
        if self.shard is not None:
            for r in self.p.worker_ranks:
                self.fabric.send(self.rank, r, TAG_DOWN, self.down_payload, "parameters payload")
            if settle:
                self._send_pieces(settle=True)
        if self.is_leader and settle:
            self._post_pieces(settle=True)

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

    # ---- 6. record -----------------------------------------------------------------------
    def record(self) -> None:
        if not self.is_leader:
            return
        combine = torch.sum if self.sequential else torch.amax
        tel = combine(self.telemetry[:, 1:], dim=0).tolist()   # decode, compute, encode, overlap
        srv = combine(self.status[:, 3:6], dim=0).tolist()      # decode, update, encode
        times = {"compute": tel[1], "encode": tel[2] + srv[2], "decode": tel[0] + srv[0],
                 "update": srv[1]}
        wall = time.perf_counter() - self.t0 - self.t_eval
        times["communicate"] = max(0.0, wall - sum(times.values()))
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
                                        "time_overlap_down": tel[4]})
        for e in self.pending + self.finished:
            if e.step == self.step:
                e.wall, e.cum = rec["wall"], (rec["cum_bytes_up"], rec["cum_bytes_down"])
                e.train_loss = rec["loss"]
        if self._settles():
            for e in list(self.pending):
                self._evaluate(e)
        # the progress line of an evaluation names its own step, loss and bytes
        for e in sorted(self.finished, key=lambda e: e.step):
            self.recorder.eval(e.step, e.loss, e.accuracy, wall=e.wall, cum=e.cum,
                               extra={"evaluated_at": e.evaluated_at})
            self.progress.update(e.step, e.train_loss, e.accuracy, *e.cum)
        if all(e.step != self.step for e in self.finished):
            self.progress.update(self.step, rec["loss"], self.test_acc, self.recorder.cum_up,
                                 self.recorder.cum_down)
        self.finished = []

    # ---- 7. checkpoints ------------------------------------------------------------------
    def _checkpoint_now(self) -> bool:
        return is_checkpoint_step(self.cfg, self.step, last=self.control == LAST)

    def own_state(self) -> dict[str, Any]:
        return {"worker": None if self.worker is None else self.worker.state_dict(),
                "shard": None if self.shard is None else self.shard.state_dict()}

    def ckpt_send(self) -> None:
        if self._checkpoint_now() and not self.is_leader:
            self.fabric.send_blob(self.rank, self.p.leader, self.own_state(), "rank state")

    def ckpt_save(self) -> None:
        if not (self._checkpoint_now() and self.is_leader):
            return
        from dist_quant.runtime.checkpoint import save_checkpoint

        p = self.p
        states = {r: (self.own_state() if r == self.rank else
                      self.fabric.recv_blob(r, self.rank, "rank state")) for r in p.ranks}
        shards = [states[p.server_ranks[s]]["shard"] for s in range(p.num_shards)]
        workers = [states[p.worker_ranks[i]]["worker"] for i in range(len(p.worker_ranks))]
        replica = torch.cat([s["replica"] for s in shards])
        for i, state in enumerate(workers):
            if not torch.equal(replica_of(self.model, state), replica):
                raise RuntimeError(f"worker {i}'s replica differs from the servers' tracked copy")
        with torch.no_grad():
            self.theta.copy_(torch.cat([s["theta"] for s in shards]).to(self.device))
        model = {k: v.to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        stop = None if self.stop_due is None else {"eval_step": self.stop_eval,
                                                    "at": self.stop_due}
        save_checkpoint(self.cfg.run_dir, self.step, {
            "format": 1, "step": self.step, "config": self.cfg.to_dict(),
            "server": {"model": model, **shards[0]}, "shards": shards[1:], "workers": workers,
            "eval_stop": stop}, keep=self.cfg.keep_checkpoints)

    # ---- start and end -------------------------------------------------------------------
    def resume_send(self) -> None:
        """The leader reads the checkpoint and hands every rank its pieces' states."""
        self.resumed: dict[str, Any] | None = None
        if not (self.cfg.resume and self.is_leader):
            return
        from dist_quant.runtime.checkpoint import load_for_resume

        state = load_for_resume(self.cfg)
        self.model.load_state_dict(state["server"]["model"])
        if (stop := state.get("eval_stop")) is not None:  # decided, not yet applied
            self.resumed_stop = (int(stop["at"]), int(stop["eval_step"]))
        shards = [state["server"], *state["shards"]]
        for r in self.p.ranks:
            w, s = self.p.worker_of(r), self.p.shard_of(r)
            mine = {"worker": None if w is None else state["workers"][w],
                    "shard": None if s is None else shards[s]}
            if r == self.rank:
                self.resumed = mine
            else:
                self.fabric.send_blob(self.rank, r, mine, "resume state")

    def resume_recv(self) -> None:
        if not self.cfg.resume:
            return
        mine = self.resumed if self.is_leader else self.fabric.recv_blob(
            self.p.leader, self.rank, "resume state")
        if self.worker is not None:
            self.worker.load_state_dict(mine["worker"])
            self.step = self.worker.step
        if self.shard is not None:
            self.shard.load_state_dict(mine["shard"])
            self.step = self.shard.step

    def open_records(self, sequential: bool) -> None:
        self.sequential = sequential
        if not self.is_leader:
            return
        start = self.step
        self.recorder = RunRecorder(self.cfg.run_dir, self.task.recorded_config(self.cfg),
                                    resume_step=start if self.cfg.resume else None,
                                    model=self.task.kind, metric=self.task.metric_name)
        self.evals = sum(1 for r in read_metrics(self.cfg.run_dir) if r["kind"] == "eval")
        self.progress = Progress(self.cfg.steps, enabled=self.cfg.progress)
        self.test_loss = self.test_acc = float("nan")
        self.test_step = None  # the step whose parameters test_loss/test_acc measure
        # a --stop-accuracy decision: the step it stops at, the evaluation that made it
        self.stop_due, self.stop_eval = self.resumed_stop
        self.pending: list[PendingEval] = []   # evaluations whose parameters are in flight
        self.finished: list[PendingEval] = []  # evaluated at this step, to be recorded

    def close_records(self, **extra: Any) -> dict[str, Any] | None:
        """The summary (``extra`` adds or replaces fields), written and printed by the leader."""
        if not self.is_leader:
            return None
        p, cfg = self.p, self.cfg
        from dist_quant.compress import get_compressor

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
            consistency=cfg.consistency), **({} if cfg.asynchronous else dict(
                eval_lag=cfg.eval_lag, test_step=self.test_step,
                stop_eval_step=self.stop_eval if self.step < cfg.steps else None)), **extra})
        self.recorder.close()
        print(summary_line(summary), flush=True)
        return summary


def _phase(ranks: list[RankRoles], name: str) -> None:
    for r in ranks:
        getattr(r, "receive_control" if name == "control" else name)()


def run_all(cfg: TrainConfig, placement: Placement, task: Task, device: torch.device,
            fabric: Any = None) -> dict[str, Any]:
    """Every rank of ``placement`` in this process (``--simulate``); returns the summary.
    The leader runs last in each phase, after the ranks whose messages it gathers."""
    fabric = fabric or LocalFabric(placement)
    order = [r for r in placement.ranks if r != placement.leader] + [placement.leader]
    ranks = [RankRoles(cfg, placement, r, task, device, fabric) for r in order]
    return _drive(cfg, ranks, sequential=True)


def run_rank(cfg: TrainConfig, placement: Placement, rank: int, task: Task,
             device: torch.device, fabric: Any) -> dict[str, Any] | None:
    """This process's rank of a distributed job; the leader returns the summary. An
    asynchronous run (``--consistency ssp|async``, ``--backup-workers``) follows arrivals
    instead: :func:`dist_quant.ps.events.run_event_rank`."""
    if cfg.asynchronous:
        from dist_quant.ps.events import run_event_rank

        return run_event_rank(cfg, placement, rank, task, device, fabric)
    return _drive(cfg, [RankRoles(cfg, placement, rank, task, device, fabric)],
                  sequential=False)


def _drive(cfg: TrainConfig, ranks: list[RankRoles], sequential: bool) -> dict[str, Any] | None:
    for name in ("resume_send", "resume_recv"):
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


def gather_roles(device: torch.device) -> tuple[list[str], list[int | None]]:
    """Every rank's ``DIST_QUANT_ROLE`` and ``DIST_QUANT_WORKER`` (one ``all_gather`` of two
    small codes per rank): the role, and the worker index a host was given (None: unset)."""
    import os

    import torch.distributed as dist

    from dist_quant.ps.placement import ROLES

    role = os.environ.get("DIST_QUANT_ROLE", "")
    code = ROLES.index(role) + 1 if role in ROLES else (0 if not role else -1)
    index = os.environ.get("DIST_QUANT_WORKER", "")
    number = int(index) if index.isdigit() else (-1 if not index else -2)
    mine = torch.tensor([code, number], dtype=torch.int64, device=device)
    codes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(codes, mine)
    roles = ["" if int(c[0]) == 0 else ROLES[int(c[0]) - 1] if int(c[0]) > 0 else "?"
             for c in codes]
    return roles, [None if int(c[1]) == -1 else int(c[1]) for c in codes]


NOTICE_GRACE = 2.0  # seconds a rank that lost the leader waits for the leader's notice
NOTICE_WAIT = 10.0  # seconds a rank waits, after its last step, for the leader's last notice


def run_distributed_rank(cfg: TrainConfig, device: torch.device, backend: str,
                         task: Task | None = None,
                         on_lost: Any = None) -> dict[str, Any] | None:
    """This torchrun process's part of the parameter-server job (``dist_quant.train``, or
    :func:`dist_quant.fit` with its ``task``; None: the MLP on ``cfg.dataset``): the training
    traffic gets its own process group with the short ``--timeout``. The leader returns the
    summary, the other ranks None.

    Lost peers: the leader that loses rank ``j`` tells every other rank through a separate
    gloo group (:meth:`~dist_quant.core.transport.Transport.notify_lost`), and ``on_lost(error)``
    runs on each of them (it should end the process), so every rank names the same peer; the
    others wait for the leader ``--timeout`` plus a grace, so the leader names the culprit
    first, and a rank that loses a peer first reports it to the leader
    (:meth:`~dist_quant.core.transport.Transport.report_lost`), which passes it on: the leader may
    be waiting on that rank meanwhile, and would blame it once it left. On a torchrun restart
    the leader's run directory decides whether every rank continues from its latest checkpoint
    (:func:`dist_quant.runtime.rank.continue_after_restart`)."""
    import datetime

    import torch.distributed as dist

    from dist_quant.config import MAX_TIMEOUT
    from dist_quant.core.transport import PeerLostError, collective
    from dist_quant.ps.fabric import RemoteFabric
    from dist_quant.ps.placement import place
    from dist_quant.ps.worker import WorkerLeaves
    from dist_quant.runtime.rank import continue_after_restart, default_run_dir

    with collective("exchanging the ranks' roles"):
        roles, indices = gather_roles(device)
    task = task or Task.from_config(cfg)
    rank = dist.get_rank()
    n = common.num_params(task.model(device))
    placement = place(cfg, n, roles, indices)
    leader = rank == placement.leader
    with collective("agreeing where to continue after a restart"):
        cfg = continue_after_restart(cfg, leader, placement.leader, device)
    with collective("connecting the ranks' links"):
        group = dist.new_group(backend=backend,
                               timeout=datetime.timedelta(seconds=cfg.timeout))
        # the lost-peer notices: gloo on the CPU, alive after the training group timed out
        notices = dist.new_group(backend="gloo",
                                 timeout=datetime.timedelta(seconds=MAX_TIMEOUT))
    if leader and not cfg.run_dir:
        cfg = cfg.replace(run_dir=default_run_dir(cfg))
    fabric = RemoteFabric(placement, rank, device, group, timeout=cfg.timeout,
                          notice_group=notices)
    with collective("waiting for every rank to start"):
        dist.barrier()
    if leader:
        reports = fabric.watch_reports(on_lost) if on_lost is not None else None
        try:
            summary = run_rank(cfg, placement, rank, task, device, fabric)
        except PeerLostError as err:
            fabric.notify_lost(err.rank)  # the other ranks name the same peer
            raise
        fabric.notify_done()
        if reports is not None:
            reports.join(timeout=NOTICE_WAIT)
        return summary
    watcher = fabric.watch_notices(on_lost) if on_lost is not None else None
    try:
        run_rank(cfg, placement, rank, task, device, fabric)
    except WorkerLeaves:
        fabric.report_done()   # the leader counts it as done; it drops it when its links close
        raise
    except PeerLostError as err:
        # the leader may be waiting on this rank: tell it who was lost, or it would blame this
        # rank once it leaves; its notice naming the rank follows: the message to give
        if watcher is not None:
            fabric.report_lost(err.rank)
            watcher.join(timeout=NOTICE_GRACE)
        raise
    fabric.report_done()
    if watcher is not None:
        watcher.join(timeout=cfg.timeout + NOTICE_WAIT)
    return None
