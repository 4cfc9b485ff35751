"""The core layer: the model, the optimizer and its schedule, and the links between ranks.

Nothing here knows about roles, runs or clusters; everything above builds on it.
"""
