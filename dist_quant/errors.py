"""Exceptions of dist_quant, in one place.

Bad input (a payload, a gradient, a value out of range, a configuration) raises a
:class:`ValueError` subclass, so callers may catch either. A run that ends on purpose raises
:class:`RunAborted`; a worker that leaves a run raises :class:`WorkerLeaves`; a peer that died
or stopped answering, :class:`PeerLostError`; a simulated cluster that could not be built or
run, :class:`ClusterError`.
"""


class PayloadError(ValueError):
    """A payload failed validation on decode (length, version, compressor, header values)."""


class NonFiniteGradientError(ValueError):
    """A tensor holding NaN or Inf was given to ``encode``; it is never quantised nor sent."""

    def __init__(self, count: int, numel: int):
        self.count = int(count)
        self.numel = int(numel)
        super().__init__(
            f"gradient holds {self.count} non-finite value(s) (NaN or Inf) out of {self.numel}; "
            "refusing to encode it"
        )


class WireRangeError(ValueError):
    """A finite value does not fit the wire type (e.g. a range above 65504 in fp16 headers)."""


class ConfigError(ValueError):
    """A configuration value is out of range; ``option`` names the command-line option."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


class RunAborted(RuntimeError):
    """The server ended the run (``--on-nonfinite abort`` or a diverged model)."""


class WorkerLeaves(Exception):  # noqa: N818 (an event, not a failure)
    """This worker leaves the run (``--inject-loss``, or it was dropped before the checkpoint
    a run resumes from): its process ends cleanly and its links close."""


class PeerLostError(RuntimeError):
    """A peer died or did not answer within the process-group timeout; ``rank`` is its global
    rank (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class ClusterError(RuntimeError):
    """The cluster could not be built, a host failed, or the machine cannot host one.

    An ``exit_code`` attribute, where set, is the status the command exits with (default 1).
    """


class ComposeError(ClusterError):
    """A compose job failed; ``exit_code`` is the job's status (2: a bad option)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
