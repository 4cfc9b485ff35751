"""The ``shapes-cnn`` task's network: a small convolutional net with BatchNorm and dropout.

::

    Conv2d(1, 16, 3, padding=1, bias=False) -> BatchNorm2d(16) -> ReLU -> MaxPool2d(2)
    Conv2d(16, 32, 3, padding=1, bias=False) -> BatchNorm2d(32) -> ReLU -> MaxPool2d(2)
    Flatten -> Dropout(0.1) -> Linear(32 * (S/4)^2, classes)

on ``S x S`` single-channel images (``S = 16``: 512 inputs to the Linear; 6,900 parameters
for 4 classes). Weights keep torch's default initialisation (Kaiming-uniform with ``a = sqrt(5)``,
drawn from the global generator: :class:`dist_quant.ps.task.Task` seeds it from the run's
``(seed, INIT)`` around the construction); the dropout masks come from the global generator too
(the task scopes it per worker and step). BatchNorm's running statistics are averaged over
the workers at evaluation, as for the MLP.
"""

from __future__ import annotations

from torch import nn

DROP = 0.1


def shapes_cnn(size: int = 16, classes: int = 4) -> nn.Sequential:
    """The network of the module docstring for ``size x size`` images and ``classes``."""
    if size % 4:
        raise ValueError(f"the image size must be a multiple of 4 (two 2x2 poolings); got {size}")
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(DROP),
        nn.Linear(32 * (size // 4) ** 2, classes))
