"""The small fixed-size messages of the parameter-server step, besides payloads and blobs.

Both ends of a link know every size from the config, so each message below is a tensor of a
fixed length (the tags are :mod:`dist_quant.ps.fabric`'s).

- ``STATUS`` (server -> leader, ``float64[11]``): one per synchronous step, one per update in
  the asynchronous step.
- ``TELEMETRY`` (worker -> leader, ``float64``, :mod:`dist_quant.ps.worker`); the
  asynchronous step appends the worker's waiting time (``TELEMETRY_ASYNC``).
- Control (leader -> worker): synchronous, ``int64[1]``: ``CONTINUE``, ``LAST`` or ``ABORT``;
  asynchronous, ``int64[CONTROL]`` = (code, argument): ``GO`` (argument: whether the next
  gradient brings BatchNorm statistics), ``STATE`` (send the rank's state for a checkpoint),
  ``RESHARD`` (argument: a dropped worker whose examples are shared out), ``LAST``, ``ABORT``.
- Command (leader -> every other server, asynchronous only, ``int64[HEAD + W]``):
  (op, step, number of workers, summed staleness, the workers, ``-1`` padding); ``op`` is one of
  ``UPDATE``, ``DROP``, ``RELEASE``, ``EVAL``, ``SAVE``, ``STOP``, ``HALT``, ``LOST``.
"""

from __future__ import annotations

from dist_quant.core.transport import ABORT, CONTINUE, LAST
from dist_quant.ps.worker import TELEMETRY

# server -> leader: rows left out, could not step (0/1), abort requested (0/1),
# decode s, update s, encode s, bytes received over links, bytes to send over links, then the
# decode, update and encode in this server thread's CPU seconds (dist_quant.runtime.phasetime)
STATUS = ("left_out", "stuck", "abort", "decode", "update", "encode", "bytes_up", "bytes_down",
          "cpu_decode", "cpu_update", "cpu_encode")

TELEMETRY_ASYNC = (*TELEMETRY, "wait")

GO, STATE, RESHARD = CONTINUE, 3, 4   # asynchronous controls besides LAST and ABORT
CONTROL = 2                           # an asynchronous control: code, argument
UPDATE, DROP, RELEASE, EVAL, SAVE, STOP, HALT, LOST = range(8)
HEAD = 4                              # a command's head: op, step, workers, staleness sum


def cpu_phases(telemetry: list[float], status: list[float], rest: float) -> dict[str, float]:
    """A step's ``cpu`` (seconds of thread CPU time, :mod:`dist_quant.runtime.phasetime`) from
    the workers' ``TELEMETRY`` (combined over gradients: summed, the largest or the mean), the
    servers' ``STATUS`` (combined alike) and the recording thread's ``rest``
    (``communicate``): the same phases as the step's ``time``."""
    def tel(name: str) -> float:
        return telemetry[TELEMETRY.index(name)]

    def srv(name: str) -> float:
        return status[STATUS.index(name)]

    return {"compute": tel("cpu_compute"), "encode": tel("cpu_encode") + srv("cpu_encode"),
            "decode": tel("cpu_decode") + srv("cpu_decode"), "update": srv("cpu_update"),
            "communicate": rest}


def cpu_roles(telemetry: list[float], status: list[float]) -> dict[str, dict[str, float]]:
    """The phases of :func:`cpu_phases` by role (``cpu_roles`` of a step line): the workers'
    ``compute``, ``encode`` (uplink) and ``decode`` (downlink), the servers' ``decode``
    (uplink), ``update`` and ``encode`` (downlink)."""
    tel = dict(zip(TELEMETRY, telemetry, strict=False))
    srv = dict(zip(STATUS, status, strict=True))
    return {"worker": {p: tel[f"cpu_{p}"] for p in ("compute", "encode", "decode")},
            "server": {p: srv[f"cpu_{p}"] for p in ("decode", "update", "encode")}}


__all__ = ["ABORT", "CONTINUE", "CONTROL", "DROP", "EVAL", "GO", "HALT", "HEAD", "LAST", "LOST",
           "RELEASE", "RESHARD", "SAVE", "STATE", "STATUS", "STOP", "TELEMETRY",
           "TELEMETRY_ASYNC", "UPDATE", "cpu_phases", "cpu_roles"]
