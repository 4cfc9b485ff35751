"""The version of dist_quant, in one place (read by the packaging and recorded by every run)."""

__version__ = "0.1.0"
