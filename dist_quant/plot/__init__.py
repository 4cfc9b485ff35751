"""Figures and the report table read from run directories (``dist-quant plot``)."""
