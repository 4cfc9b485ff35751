"""Exceptions of dist_quant: both are ValueErrors, so callers may catch either."""


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
