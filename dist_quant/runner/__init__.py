"""Starting a job: the checks before launch, torchrun on one machine and its watcher, and the
single-process reference (``--simulate``).
"""
