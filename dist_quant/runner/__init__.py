"""Starting a job: the checks before launch, torchrun on one machine, the process of one rank,
and the single-process reference (``--simulate``).
"""
