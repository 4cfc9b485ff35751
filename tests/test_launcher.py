"""What the launcher shows of torchrun's stderr: progress and one line per distinct error;
everything else stays in the log. Fed real torchrun output shapes, byte by byte too."""

from __future__ import annotations

import io

from dist_quant.runner.launcher import StderrFilter, failure_report

TORCHRUN = (
    "W1201 03:14:14.591000 14117 api.py:1028] Sending process 14171 closing signal SIGTERM\n"
    "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
    "RuntimeError: boom\n"
    "dist_quant rank 0: lost contact with rank 2 (worker 1) while exchanging the telemetry "
    "(Connection reset by peer): a peer died or did not answer within --timeout 5 s; ending\n"
    "dist_quant rank 1: rank 2 (worker 1) stopped answering (reported by rank 0 (the server)): "
    "a peer died or did not answer within --timeout 5 s; ending\n"
    "dist_quant rank 3: rank 2 (worker 1) stopped answering (reported by rank 0 (the server)): "
    "a peer died or did not answer within --timeout 5 s; ending\n"
    "E1201 03:14:14.865000 14117 api.py:1002] failed (exitcode: -9) local_rank: 2 (pid: 14172)"
    " of binary: python\n"
    "dist_quant.train FAILED\n"
)


def shown(chunks) -> tuple[str, StderrFilter]:
    out = io.StringIO()
    filt = StderrFilter(out)
    for chunk in chunks:
        filt.feed(chunk)
    filt.close()
    return out.getvalue(), filt


def test_errors_once_progress_through_the_rest_only_in_the_log():
    text = "\r[##........] 2/10  loss 2.3\r[####......] 4/10  loss 2.1" + "\n" + TORCHRUN
    data = text.encode()
    whole, _ = shown([data])
    bytewise, filt = shown([data[i:i + 1] for i in range(len(data))])
    assert whole == bytewise
    lines = whole.split("\n")
    assert lines[0] == "\r[##........] 2/10  loss 2.3\r[####......] 4/10  loss 2.1"
    assert lines[1].startswith("dist_quant rank 0: lost contact with rank 2 (worker 1)")
    assert lines[2].startswith("dist_quant rank 1: rank 2 (worker 1) stopped answering")
    assert lines[3] == "dist_quant: rank 2 (worker 1) was killed by SIGKILL"
    assert lines[4:] == [""]   # rank 3's copy, the traceback and torchrun's lines: log only
    assert filt.closing and filt.closing[0][0] == 14171


def test_failure_report_names_ranks_nobody_explained():
    report = ("  rank      : 0 (local_rank: 0)\n  exitcode  : -9 (pid: 12)\n"
              "  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 13)\n")
    assert failure_report(report, "ps", []) == ["dist_quant: rank 0 (the server) was killed "
                                                "by SIGKILL",
                                                "dist_quant: rank 1 (worker 0) failed with exit "
                                                "status 1 (its traceback is in the log)"]
    explained = ["dist_quant: rank 0 (the server) was killed by SIGKILL", "dist_quant rank 1: x"]
    assert failure_report(report, "ps", explained) == []


def run_with_full_log(tmp_path, code: int) -> str:
    """run_torchrun of a command that prints one rank line, its launch.log on /dev/full (every
    write: ENOSPC)."""
    import sys

    from dist_quant.runner.launcher import run_torchrun

    (tmp_path / "launch.log").symlink_to("/dev/full")
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('Traceback (most recent call "
           f"last):\\ndist_quant rank 0: boom\\n'); sys.exit({code})"]
    out = io.StringIO()
    assert run_torchrun(cmd, {}, tmp_path, out=out) == code
    return out.getvalue()


def test_a_log_the_disk_cannot_take_loses_nothing_shown_and_says_so(tmp_path):
    lines = run_with_full_log(tmp_path, 1).splitlines()
    assert lines == ["dist_quant rank 0: boom",
                     f"dist_quant: the run failed (exit status 1); {tmp_path / 'launch.log'} is "
                     "incomplete (No space left on device)"]


def test_a_finished_run_says_its_log_is_incomplete(tmp_path):
    lines = run_with_full_log(tmp_path, 0).splitlines()
    assert lines == ["dist_quant rank 0: boom",
                     f"dist_quant: {tmp_path / 'launch.log'} is incomplete (No space left on "
                     "device)"]


def test_an_unwritable_run_directory_starts_nothing(tmp_path):
    from dist_quant.runner.launcher import run_torchrun

    (tmp_path / "file").write_text("")
    out = io.StringIO()
    assert run_torchrun(["false"], {}, tmp_path / "file" / "run", out=out) == 1
    assert out.getvalue().startswith(f"dist_quant: cannot write {tmp_path}/file/run/launch.log")
    assert out.getvalue().count("\n") == 1


def test_ranks_torchrun_stopped_after_a_failure_are_not_reported_as_killed():
    """rank 0 fails; torchrun stops ranks 1 and 2 (SIGTERM; the launcher's SIGKILL for one
    that did not end): neither is a fault, whichever torchrun saw first or lists after."""
    log = ("W1201 03:14:14.591000 14117 api.py:1028] Sending process 21 closing signal SIGTERM\n"
           "W1201 03:14:14.592000 14117 api.py:1028] Sending process 22 closing signal SIGTERM\n"
           "E1201 03:14:14.865000 14117 api.py:1002] failed (exitcode: -15) local_rank: 1 "
           "(pid: 21) of binary: python\n")
    out, filt = shown([log.encode()])
    assert out == "" and filt.errors == [] and filt.closed == {21, 22}
    report = ("  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 20)\n"
              "  rank      : 1 (local_rank: 1)\n  exitcode  : -15 (pid: 21) (SIGTERM)\n"
              "  rank      : 2 (local_rank: 2)\n  exitcode  : -9 (pid: 22) (SIGKILL)\n")
    explained = ["dist_quant rank 0: run aborted: cannot write x"]
    assert failure_report(report, "ps", explained, filt.closed) == []
    # a rank killed by a signal nobody sent it from here is still named
    assert failure_report(report, "ps", explained, {21}) == [
        "dist_quant: rank 2 (worker 1) was killed by SIGKILL"]
