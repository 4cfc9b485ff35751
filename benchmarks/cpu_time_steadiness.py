"""Wall time and thread CPU time of the default MLP step's phases, alone and beside two busy
processes: which clock holds still when the machine is loaded.

Run from the repository root (not part of the test suite)::

    python benchmarks/cpu_time_steadiness.py [--steps 200] [--rounds 2] [--busy 2]

One process, one torch thread (as every training process), the default configuration
(``TrainConfig()``: the MLP of ``--hidden``, batch ``--batch-size``, onebit uplink, fp32
downlink, W workers). Each step runs the code of a real step: worker 0's
:meth:`~dist_quant.ps.worker.Worker.step_up` (``down_decode``: the previous downlink applied
to its replica, ``compute``: forward and backward, ``encode``: the uplink payload), then the
star's :class:`~dist_quant.ps.shard.ShardServer` on W copies of that payload (``decode``: the
mean of the W rows, ``update``: the optimizer, ``down_encode``: the downlink), each phase
measured on both clocks by :mod:`dist_quant.runtime.phasetime` (wall: ``perf_counter``; CPU:
``thread_time``). No bytes move.

Conditions, measured in the same run: ``quiet`` (nothing started beside it) and ``loaded``
(``--busy`` processes spinning on the CPU, started before and stopped after), alternated over
``--rounds`` rounds of ``--steps`` steps each after ``--warmup`` steps; each figure is the
median over every step of a condition. Printed: per phase the median wall and CPU time in ms
per condition and the ratios loaded / quiet, with the CPU model, the cores the process had and
the load average before and after each condition (other jobs on the machine are part of
``quiet``: the load average says how much).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from dist_quant.config import TrainConfig
from dist_quant.ps.shard import ShardServer
from dist_quant.ps.task import Task
from dist_quant.ps.worker import TELEMETRY, Worker
from dist_quant.runtime.metrics import cores, load_average, machine
from dist_quant.runtime.phasetime import now

PHASES = ("compute", "encode", "decode", "update", "down_encode", "down_decode")
SPIN = "while True:\n    pass\n"


class Step:
    """Worker 0 and the star's server of the default configuration, stepping on one thread."""

    def __init__(self, cfg: TrainConfig):
        device = torch.device("cpu")
        task = Task.from_config(cfg)
        self.workers = cfg.workers
        self.worker = Worker(cfg, task, 0, device)
        model = task.model(device)
        n = sum(p.numel() for p in model.parameters())
        self.server = ShardServer(cfg, model, 0, n, 0, device)

    def run(self) -> dict[str, tuple[float, float]]:
        """One step; (wall, cpu) seconds per phase."""
        payloads, tel = self.worker.step_up()
        tel = dict(zip(TELEMETRY, tel.tolist(), strict=True))
        rows = payloads[0].unsqueeze(0).expand(self.workers, -1).contiguous()
        t0 = now()
        g, _ = self.server.aggregate(rows)
        t1 = now()
        self.server.update(g)
        t2 = now()
        down = self.server.downlink()
        t3 = now()
        self.worker.receive_downlink([down.clone()])   # applied at the next step_up
        out = {p: (tel[p], tel[f"cpu_{p}"]) for p in ("compute", "encode")}
        out["down_decode"] = (tel["decode"], tel["cpu_decode"])
        for phase, (a, b) in (("decode", (t0, t1)), ("update", (t1, t2)),
                              ("down_encode", (t2, t3))):
            spent = b - a
            out[phase] = (spent.wall, spent.cpu)
        return out


def measure(step: Step, steps: int) -> dict[str, list[tuple[float, float]]]:
    got: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES}
    for _ in range(steps):
        for phase, value in step.run().items():
            got[phase].append(value)
    return got


def busy(count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    time.sleep(0.5)   # let them reach the CPU
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=10)


def fmt_load(load: list[float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per condition and round")
    parser.add_argument("--rounds", type=int, default=2, help="quiet/loaded alternations")
    parser.add_argument("--warmup", type=int, default=20, help="steps before measuring")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig().validate()
    step = Step(cfg)
    measure(step, args.warmup)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {
        c: {p: [] for p in PHASES} for c in ("quiet", "loaded")}
    loads = []
    for r in range(args.rounds):
        for condition in ("quiet", "loaded"):
            procs = busy(args.busy) if condition == "loaded" else []
            try:
                before = load_average()
                got = measure(step, args.steps)
                after = load_average()
            finally:
                stop(procs)
            loads.append(f"round {r + 1} {condition}: load average {fmt_load(before)} "
                         f"before, {fmt_load(after)} after")
            for phase, values in got.items():
                results[condition][phase].extend(values)

    info = machine()
    print(f"CPU: {info['cpu']}; cores: {cores()}")
    print(f"torch {torch.__version__}, 1 thread; python {sys.version.split()[0]}")
    print(f"default configuration: hidden {cfg.hidden}, batch {cfg.batch_size}, W = "
          f"{cfg.workers}, uplink {cfg.compressor}, downlink {cfg.downlink}")
    print(f"{args.rounds} rounds x {args.steps} steps per condition after {args.warmup} warm-up "
          f"steps; loaded = {args.busy} busy processes beside it")
    for line in loads:
        print(line)
    print()
    print("medians per step, ms")
    print(f"{'phase':<12} {'wall quiet':>10} {'wall loaded':>11} {'ratio':>6}   "
          f"{'cpu quiet':>9} {'cpu loaded':>10} {'ratio':>6}")
    totals = {c: [0.0, 0.0] for c in results}
    for phase in PHASES:
        row = []
        for condition in ("quiet", "loaded"):
            values = results[condition][phase]
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            totals[condition][0] += wall
            totals[condition][1] += cpu
            row.append((wall, cpu))
        (wq, cq), (wl, cl) = row
        print(f"{phase:<12} {1e3 * wq:10.3f} {1e3 * wl:11.3f} {wl / wq:6.2f}   "
              f"{1e3 * cq:9.3f} {1e3 * cl:10.3f} {cl / cq:6.2f}")
    (wq, cq), (wl, cl) = totals["quiet"], totals["loaded"]
    print(f"{'sum':<12} {1e3 * wq:10.3f} {1e3 * wl:11.3f} {wl / wq:6.2f}   "
          f"{1e3 * cq:9.3f} {1e3 * cl:10.3f} {cl / cq:6.2f}")


if __name__ == "__main__":
    main()
