"""Repeat the interruption and fault tests N times beside busy CPU-bound processes and report
the failures of each test (not part of the default test run: pytest collects ``test_*.py``).

    python tests/stress/repeat.py -n 20 --busy 2
    python tests/stress/repeat.py -n 5 tests/test_faults.py     (any pytest node ids)
    python tests/stress/repeat.py -n 20 --keep stress-logs --company tests/test_chaos.py

Each failing run's whole output (pytest's report, the captured output of the test) is written to
``--keep DIR`` as ``round-K-<test>.log``, so a failure seen once can be read, not guessed at.
``--company FILE_OR_NODE`` (repeatable) runs those tests first in the same pytest process as
the test, each round: the test then runs after what the suite runs before it (its processes,
namespaces, ports and files), not only on a fresh interpreter.

Each round runs every test in its own pytest process (as the suite would, fixtures included),
one after the other; the busy processes spin for the whole run. The namespace and compose
tests are never run at the same time. Exit status 0 when every round of every test passed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = [
    "tests/test_cluster.py::test_interrupt_removes_everything",
    "tests/test_compose_cluster.py::test_ctrl_c_removes_containers_and_network",
    "tests/test_faults.py::test_sigterm_to_the_launcher_ends_every_process_and_marks_the_run_"
    "stopped",
    "tests/test_faults.py::test_sigkill_to_the_launcher_ends_every_process_of_the_job",
    "tests/test_faults.py::test_a_hung_worker_ends_every_rank_within_the_timeout",
    "tests/test_faults.py::test_a_killed_rank_is_restarted_and_the_run_ends_bit_for_bit",
    "tests/test_faults.py::test_a_full_disk_ends_the_run_in_one_line_and_resume_elsewhere_"
    "ends_bit_for_bit",
]


def spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="*", default=DEFAULT, help="pytest node ids")
    ap.add_argument("-n", "--rounds", type=int, default=20)
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the tests")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    ap.add_argument("--keep", type=Path, default=None,
                    help="directory for the whole output of every failing run")
    ap.add_argument("--company", action="append", default=[],
                    help="tests run before the test in the same pytest process (repeatable)")
    args = ap.parse_args()
    busy = [mp.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    runs: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    try:
        for k in range(1, args.rounds + 1):
            for test in args.tests:
                t0 = time.monotonic()
                output = ""
                try:
                    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE",
                                          "-p", "no:cacheprovider", *args.company, test],
                                         cwd=ROOT, capture_output=True, text=True,
                                         timeout=args.timeout)
                    output = res.stdout + res.stderr
                    lines = res.stdout.splitlines()
                    bad = [x.split(" ", 1)[1].split(" - ")[0] for x in lines
                           if x.startswith(("FAILED ", "ERROR "))]
                    bad = [n for n in bad if n.startswith(test)] or \
                        (bad if not args.company else [])
                    code = 0 if args.company and not bad else res.returncode
                except subprocess.TimeoutExpired as err:
                    bad, code = [test], -1
                    output = f"timed out after {args.timeout:g} s\n" + \
                        "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                                for x in (err.stdout or "", err.stderr or ""))
                runs[test] += 1
                for node in bad or ([test] if code not in (0, 5) else []):
                    failed[node] += 1
                if args.keep is not None and (bad or code not in (0, 5)):
                    args.keep.mkdir(parents=True, exist_ok=True)
                    name = test.split("::")[-1].replace("/", "_")[:80]
                    (args.keep / f"round-{k}-{name}.log").write_text(output)
                print(f"round {k}/{args.rounds} {test}: "
                      f"{'ok' if not bad and code in (0, 5) else 'FAILED ' + ', '.join(bad)} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        for p in busy:
            p.terminate()
            p.join()
    print("\nfailures per test (runs of the node id given):")
    for test in args.tests:
        mine = {n: c for n, c in failed.items() if n.startswith(test)}
        print(f"  {test}: {sum(mine.values())} failed of {runs[test]} runs"
              + "".join(f"\n    {n}: {c}" for n, c in sorted(mine.items()) if n != test))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
