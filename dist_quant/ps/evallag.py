"""The synchronous step's evaluation off the critical path (``--eval-lag L``).

At an evaluation step s the workers send their BN running statistics with the step's telemetry
(``4 k`` bytes each, counted as uplink) and every server copies its shard ``theta_s``. The copy
travels to the leader in ``max(L, 1)`` contiguous pieces of near-equal size
(:func:`~dist_quant.ps.schedule.eval_pieces`), piece j (j = 0..L-1) at the start of step
s + 1 + j, before that step's compute, as a send that no step waits for
(:meth:`~dist_quant.ps.fabric.RemoteFabric.send_aside`); the leader posts their receives as
they are sent and, in the decision of step s + L, waits for the last one and evaluates.

Guarantees. The evaluation is of the parameters after step s's update with the statistics of
step s: the same numbers as evaluating at step s, since evaluation changes no training state.
If its accuracy reaches ``--stop-accuracy``, step s + L is the last: the run stops L steps
later than with ``--eval-lag 0``, with the same parameters up to there. Its evaluation line
keeps step s, with the wall time and cumulative bytes of step s (the time to target counts to
step s), and ``evaluated_at`` s + L; ``summary.json`` says which evaluation stopped the run
(``stop_eval_step``) and which step ``test_accuracy`` measures (``test_step``). The last step
(``--steps``) and every checkpoint step settle: after their control every piece left is sent
and evaluated, so a run that goes to ``--steps`` ends with its final parameters evaluated, and
a checkpoint holds no evaluation in flight; a stop decided but not yet applied is saved with
it (``eval_stop``) and a resumed run applies it at the same step. With ``--eval-lag 0`` the
servers send the whole shard in ``serve`` and the leader evaluates before the control of step
s, while every rank waits.

Order on the wire. Gloo sends the messages between two ranks in order over one connection, so
a piece still on the wire holds back whatever its server sends the leader next; a piece
therefore goes at the start of a step, once the previous step's downlinks are in, and a piece
is hidden only while the leader's link would be idle anyway (its compute). Why the default is
``EVAL_LAG`` = 8: ``benchmarks/evallag-2026-12-06``. The star's server is the leader: its
pieces never leave the process, and the lag only moves the decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_quant.config import stop_reached
from dist_quant.ps.fabric import TAG_THETA
from dist_quant.ps.schedule import eval_pieces, pieces_upto
from dist_quant.ps.server import evaluate_model
from dist_quant.runtime.phasetime import Clocks, now, since


@dataclass
class PendingEval:
    """The leader's evaluation of step ``step``: the workers' averaged BN statistics (taken at
    that step), the parameters being gathered into ``theta`` (``sent`` pieces of each shard
    posted, ``waits`` their receives), and, once the step is recorded, its ``wall`` and
    cumulative bytes, which the evaluation line carries; ``spent``: the evaluation's own wall
    and CPU time (waits for its pieces excluded)."""

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
    spent: Clocks | None = None


class LaggedEvaluation:
    """The synchronous rank's part of a lagged evaluation (a mixin of
    :class:`~dist_quant.ps.sync_step.SyncRank`, whose state it reads: ``cfg``, ``p``,
    ``rank``, ``fabric``, ``shard``, ``step``, ``checkpoint_now()`` and, on the leader,
    ``model``, ``theta``, the test split and the records).

    A server keeps ``outgoing``: ``[step s, its shard at s, pieces sent]`` per evaluation in
    flight; the leader keeps ``pending`` (evaluations whose parameters are in flight) and
    ``evaluated`` (evaluated at this step, to be recorded), and ``stop_due``, ``stop_eval``: a
    ``--stop-accuracy`` decision, the step it stops at and the evaluation that made it."""

    def open_evaluations(self, resumed_stop: tuple[int | None, int | None]) -> None:
        self.lag = self.cfg.eval_lag
        self.outgoing: list[list] = []
        if self.is_leader:
            self.test_step: int | None = None  # the step test_loss/test_acc measure
            self.stop_due, self.stop_eval = resumed_stop
            self.pending: list[PendingEval] = []
            self.evaluated: list[PendingEval] = []

    def send_pieces(self, settle: bool) -> None:
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

    def post_pieces(self, settle: bool) -> None:
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

    def evaluate(self, e: PendingEval) -> None:
        """Leader: wait for the rest of ``e``'s parameters and evaluate them; an accuracy at
        ``--stop-accuracy`` makes step ``e.step + lag`` the last."""
        for wait in e.waits:
            wait()
        t0 = now()
        with torch.no_grad():
            self.theta.copy_(e.theta)
        e.loss, e.accuracy = evaluate_model(self.model, self.x_test, self.y_test, e.stats,
                                            self.task.loss_fn, self.task.metric)
        e.spent = since(t0, charge_cpu=True)
        e.evaluated_at = self.step
        self.test_loss, self.test_acc, self.test_step = e.loss, e.accuracy, e.step
        self.evals += 1
        if self.stop_due is None and stop_reached(self.cfg, e.loss, e.accuracy):
            self.stop_due, self.stop_eval = e.step + self.lag, e.step
        self.pending.remove(e)
        self.evaluated.append(e)

    def settles(self) -> bool:
        """Whether this step finishes every evaluation in flight (after its control): the run
        ends here or a checkpoint is taken, which holds no evaluation in flight."""
        return self.lag > 0 and self.checkpoint_now()
