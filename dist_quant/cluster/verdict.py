"""The verdict of a chaos run: the disturbed job's final state against the undisturbed one's,
bit for bit; every fault named by the job; an asynchronous job's counts that add up
(:mod:`dist_quant.cluster.chaos` has the whole contract)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from dist_quant.cluster.faults import Fault


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_reference(cfg, out: Path, replay: Path | None = None) -> int:
    """The undisturbed job in one process (``--simulate``; ``replay``: following the record
    of that run directory); its output goes to ``out/reference.err``."""
    ref = cfg.replace(simulate=True, max_restarts=0, run_dir=str(out / "reference"),
                      progress=False, replay=str(replay) if replay else "")
    with open(out / "reference.err", "w") as ferr:
        return subprocess.run([sys.executable, "-m", "dist_quant", "train", *ref.to_argv()],
                              stdout=subprocess.DEVNULL, stderr=ferr, env=_env()).returncode


def differences(x: Any, y: Any, where: str = "", limit: int = 5) -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) differ, bit for bit; at most
    ``limit`` places."""
    import torch  # the states are tensors; torch stays out of the option checks

    out: list[str] = []

    def bits(t: torch.Tensor) -> torch.Tensor:   # so -0.0 differs from 0.0, NaN equals NaN
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    def walk(a: Any, b: Any, at: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                out.append(f"{at or '.'}: keys {sorted(map(str, a.keys() ^ b.keys()))}")
                return
            for k in a:
                walk(a[k], b[k], f"{at}.{k}")
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
            if len(a) != len(b):
                out.append(f"{at}: {len(a)} items against {len(b)}")
                return
            for i, (u, v) in enumerate(zip(a, b, strict=True)):
                walk(u, v, f"{at}[{i}]")
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(bits(a), bits(b)):
                out.append(at)
        elif a != b:
            out.append(at)

    walk(x, y, where)
    return out


def final_state(run_dir: Path) -> dict:
    """The latest checkpoint's state, without the config (which names the run)."""
    # torch is needed to read a checkpoint; it stays out of the option checks
    from dist_quant.runtime.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run_dir))
    state.pop("config", None)
    return state


def without_timing(state: dict) -> dict:
    """An asynchronous job's final state without what measures time (the workers' waits, the
    telemetry of gradients not applied yet) or names where arrivals came from (the network's
    words, the clock, the record): what its replay cannot know."""
    st = state.get("consistency")
    if isinstance(st, dict):
        st.pop("wait_by", None)
        st.pop("order", None)
        for info in [*st.get("queue", []), *st.get("held", {}).values()]:
            info.pop("telemetry", None)
            info.pop("cause", None)
    return state


def records(run_dir: Path, kind: str) -> list[dict]:
    out = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("kind") == kind:
                    out.append(rec)
    return out


def summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


RESTART = re.compile(r"^dist_quant: restart (\d+): ")


def name_faults(faults: list[Fault], err: str, cfg) -> tuple[list[str], list[str]]:
    """What the job's output must say of each fault: (the failures, one line each; notes).

    A killed rank must be named and followed by a restart line (continuing from the latest
    checkpoint, or starting over before the first one). A restart that no fault of the plan
    explains (a peer that missed ``--timeout`` on a loaded machine) is a note, not a
    failure: the final state must still be equal."""
    lines = err.splitlines()
    restarts = [i for i, x in enumerate(lines) if RESTART.match(x)]
    problems, notes = [], []
    used: set[int] = set()
    for i, f in enumerate(faults, 1):
        if f.seen_step is None:
            problems.append(f"fault {i} ({f.describe()}) was not injected: the job ended first")
            continue
        if f.kind == "kill":
            said = [j for j, x in enumerate(lines) if f"{f.name} was killed by SIGKILL" in x
                    and j not in used]
            said += [j for j, x in enumerate(lines) if f"lost contact with {f.name}" in x
                     and j not in used]
            if not said:
                problems.append(f"fault {i} ({f.describe()}): no line of the job names {f.name}")
                continue
            j = min(said)
            after = [r for r in restarts if r > j and r not in used]
            if not after:
                problems.append(f"fault {i} ({f.describe()}): no restart followed")
            else:
                used.add(after[0])
            used.update(k for k in said if k < (after[0] if after else len(lines)))
            mine = [k for k in said if k < (after[0] if after else len(lines))]
            f.named = lines[next((k for k in mine if lines[k].endswith("SIGKILL")), j)]
        elif f.kind == "lose":
            label = f"w{f.target + 1}"
            said = [x for x in lines if f"host {label} (" in x and "goes on without it" in x]
            if not said:
                problems.append(f"fault {i} ({f.describe()}): no line of the job names host "
                                f"{label}")
            f.named = said[0] if said else ""
    for r in restarts:
        if r not in used:
            cause = next((x for x in reversed(lines[:r]) if x.startswith("dist_quant")
                          and not RESTART.match(x)), "no line before it")
            notes.append(f"a restart no fault of the plan explains: {lines[r]} (after: {cause})")
    return problems, notes


def check_sync(cfg, out: Path, faults: list[Fault], code: int, err: str) -> dict:
    job, ref = Path(cfg.run_dir), out / "reference"
    problems = [] if code == 0 else [f"the job ended with exit status {code} (see job.err)"]
    named, notes = name_faults(faults, err, cfg)
    problems += named
    diff: list[str] = []
    if code == 0:
        if run_reference(cfg, out) != 0:
            problems.append("the undisturbed run failed (see reference.err)")
        else:
            diff = differences(final_state(job), final_state(ref))
            if diff:
                problems.append("the final state differs from the undisturbed run's at "
                                + ", ".join(diff))
            if summary(job).get("test_loss") != summary(ref).get("test_loss"):
                problems.append("the test loss differs from the undisturbed run's")
    return {"problems": problems, "notes": notes, "differences": diff,
            "compared_with": "undisturbed"}


def check_async(cfg, out: Path, faults: list[Fault], code: int, err: str) -> dict:
    job = Path(cfg.run_dir)
    problems = [] if code == 0 else [f"the job ended with exit status {code} (see job.err)"]
    named, notes = name_faults(faults, err, cfg)
    problems += named
    diff: list[str] = []
    counts: dict[str, Any] = {}
    if code == 0:
        summ = summary(job)
        lost = [r["worker"] for r in records(job, "lost")]
        meant = [f.target for f in faults if f.kind == "lose" and f.seen_step is not None]
        for f in faults:   # the record's own words for the worker the job dropped
            rec = next((r for r in records(job, "lost") if r["worker"] == f.target), None)
            if f.kind == "lose" and rec is not None:
                f.named += f"; record: worker {rec['worker']} lost at step {rec['step']}: " \
                    f"{rec.get('cause', '')}"
        if sorted(lost) != sorted(meant):
            problems.append(f"the record's lost workers are {lost}; the lost hosts ran "
                            f"workers {meant}")
        updates = records(job, "update")
        counts = {"applied": sum(summ.get("applied_per_worker", [])),
                  "dropped": sum(summ.get("dropped_per_worker", [])),
                  "gradients": summ.get("gradients"), "update_lines": len(updates),
                  "updates": summ.get("updates"), "steps": summ.get("steps"),
                  "workers": cfg.workers, "workers_at_end": summ.get("workers_at_end")}
        if not counts["applied"] + counts["dropped"] == counts["gradients"] == len(updates):
            problems.append(f"the counts do not add up: applied {counts['applied']} + dropped "
                            f"{counts['dropped']}, gradients {counts['gradients']}, update "
                            f"lines {len(updates)}")
        if counts["updates"] != (counts["steps"] or 0) * cfg.workers:
            problems.append(f"{counts['updates']} gradients made the updates of "
                            f"{counts['steps']} steps of W = {cfg.workers}")
        arrivals = [r.get("arrival") for r in updates]
        if len(set(arrivals)) != len(arrivals):
            problems.append("an arrival is recorded twice")
        if run_reference(cfg, out, replay=job) != 0:
            problems.append("the replay of the job's record failed (see reference.err)")
        else:
            ref = out / "reference"
            diff = differences(without_timing(final_state(job)),
                               without_timing(final_state(ref)))
            if diff:
                problems.append("the final state differs from the replay's at "
                                + ", ".join(diff))
            if summ.get("test_loss") != summary(ref).get("test_loss"):
                problems.append("the test loss differs from the replay's")
    return {"problems": problems, "notes": notes, "differences": diff, "counts": counts,
            "compared_with": "replay"}
