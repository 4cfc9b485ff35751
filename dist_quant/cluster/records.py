"""What every cluster engine shows and writes: the progress tail, log tails and the wire record.

- :class:`MetricsTail` follows the job's ``metrics.jsonl`` while the hosts run and draws the
  training progress on stderr (:class:`JsonlFollower` reads the lines appended since the last
  look).
- :func:`wire_record` turns per-host counter deltas into the direction totals of
  ``wire.json``: ``wire_bytes_*``, ``payload_bytes_*``, ``ratio_* = wire / payload``,
  ``ack_bytes_*`` (the pure TCP ACKs among them) and ``data_ratio_*`` (the ratio without
  them); :func:`traffic` says how the hosts' bytes split into the two directions.
- :func:`log_tail` is the end of a host's log, for one-line failures.
- ``QUEUE_FRAMES`` (the rate limiter's queue, ``link.json``'s ``queue_frames``) and ``REPO``
  (where ``launch/node.sh`` and ``docker-compose.yml`` are found) are the same for every
  engine: each host runs the same launch script.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from dist_quant.config import TrainConfig
from dist_quant.ps.schedule import is_eval_step
from dist_quant.runtime.progress import Progress

REPO = Path(__file__).resolve().parents[2]
QUEUE_FRAMES = 1000  # rate limiter queue: as deep as a NIC queue (txqueuelen 1000)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of the text file ``path`` ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class JsonlFollower:
    """The records appended to a JSON-lines file since the last call (a file rewritten shorter,
    as a resume does, is read again from its start; a line still being written waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path) as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:
                    self.offset, self.partial = 0, ""
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
        except OSError:
            return []
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        records = []
        for line in filter(None, lines):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


class MetricsTail:
    """Follows ``metrics.jsonl`` while the hosts run and draws the training progress (steps,
    loss, accuracy, MB up and down) with :class:`dist_quant.runtime.progress.Progress` on
    stderr: the server's own bar goes to its host log. Call :meth:`poll` as often as the
    engine looks at its hosts and :meth:`close` once they are done. ``dilate``: the time
    dilation (:mod:`dist_quant.cluster.dilation`), the bar's times are the wall's / dilate."""

    def __init__(self, metrics: Path, cfg: TrainConfig, dilate: float = 1.0):
        self.follower, self.cfg = JsonlFollower(metrics), cfg
        self.progress = Progress(cfg.steps, cfg.progress, dilate=dilate)
        self.acc = float("nan")
        self.losses: dict[int, float] = {}  # training loss of each step seen

    def poll(self) -> None:
        for rec in self.follower.new_records():
            kind = rec.get("kind")
            if kind == "step":
                self.losses[rec["step"]] = rec["loss"]
            if kind == "eval":
                self.acc = rec["test_accuracy"]
            # an evaluation step is drawn at its eval line, which follows the step's line
            # (--eval-lag steps later: the line carries its own step's bytes)
            if kind == "eval" or (kind == "step" and not is_eval_step(self.cfg, rec["step"])):
                self.progress.update(rec["step"], self.losses.get(rec["step"], float("nan")),
                                     self.acc, rec["cum_bytes_up"], rec["cum_bytes_down"])

    def close(self) -> None:
        self.poll()
        self.progress.close()


def traffic(cfg: TrainConfig) -> str:
    """How :func:`wire_record` splits the hosts' bytes: ``ps`` (servers ``s*`` against
    workers) or ``ddp`` (every host sends and receives alike: allreduce, colocated servers)."""
    return "ddp" if cfg.method == "ddp" or cfg.colocate else "ps"


def _ratio(wire: int, payload: int) -> float | None:
    return wire / payload if payload > 0 else None


def wire_record(method: str, delta: dict[str, dict[str, int]], payload_up: int,
                payload_down: int, side: str = "tx") -> dict:
    """Wire bytes per direction from per-host counter deltas (labels ``s*`` are servers).

    ``method``: :func:`traffic`'s split. ``side="tx"``: up = what the workers transmitted,
    down = what the server transmitted. ``side="rx"``: the same directions counted where they
    arrive (up = what the server received, down = what the workers received). ddp: all
    ranks, the total split evenly. ``ack_bytes_*`` are the pure-ACK frames among them
    (counted where they arrive: the workers' ACKs at the server, the server's at the
    workers), ``data_ratio_*`` the ratio without them: the framing overhead of the payload's
    own direction. A ratio is None when its payload is 0.
    """
    key = f"{side}_bytes"
    wire = {h: v[key] for h, v in delta.items()}
    acks = {h: v.get("ack_rx_bytes", 0) for h, v in delta.items()}
    if method == "ddp":
        total, ack_total = sum(wire.values()), sum(acks.values())
        up, down = total // 2, total - total // 2
        ack_up, ack_down = ack_total // 2, ack_total - ack_total // 2
    else:
        servers = sum(v for h, v in wire.items() if h.startswith("s"))
        workers = sum(v for h, v in wire.items() if not h.startswith("s"))
        up, down = (workers, servers) if side == "tx" else (servers, workers)
        ack_up = sum(v for h, v in acks.items() if h.startswith("s"))
        ack_down = sum(v for h, v in acks.items() if not h.startswith("s"))
    return {"wire_bytes_up": up, "wire_bytes_down": down,
            "payload_bytes_up": payload_up, "payload_bytes_down": payload_down,
            "ratio_up": _ratio(up, payload_up), "ratio_down": _ratio(down, payload_down),
            "ack_bytes_up": ack_up, "ack_bytes_down": ack_down,
            "data_ratio_up": _ratio(up - ack_up, payload_up),
            "data_ratio_down": _ratio(down - ack_down, payload_down)}
