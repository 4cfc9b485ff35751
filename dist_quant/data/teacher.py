"""A synthetic teacher-network task: a fixed random MLP labels Gaussian inputs.

``x ~ N(0, I_40)``; the teacher is ``logits = W2 tanh(W1 x / sqrt(40)) / sqrt(64)`` with
standard normal ``W1`` [64, 40] and ``W2`` [10, 64]. To keep the classes roughly balanced each
logit is centred and scaled by its mean and std over the training inputs (the same offsets
are used for the test inputs), and the label is the arg-max. The task is exactly learnable by
a network of the teacher's size, which makes it a clean check that compression slows
optimisation rather than hiding a modelling gap.
"""

from __future__ import annotations

import numpy as np

IN_FEATURES = 40
TEACHER_HIDDEN = 64
NUM_CLASSES = 10
DATA_SEED = 42


def make_teacher(train_size: int = 4000, test_size: int = 1000, seed: int = DATA_SEED
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [N, 40], y_train [N], x_test, y_test), float64 and int64."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((TEACHER_HIDDEN, IN_FEATURES)) / np.sqrt(IN_FEATURES)
    w2 = rng.standard_normal((NUM_CLASSES, TEACHER_HIDDEN)) / np.sqrt(TEACHER_HIDDEN)
    x_train = rng.standard_normal((train_size, IN_FEATURES))
    x_test = rng.standard_normal((test_size, IN_FEATURES))

    def logits(x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ w1.T) @ w2.T

    ref = logits(x_train)
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    y_train = np.argmax((ref - mean) / std, axis=1)
    y_test = np.argmax((logits(x_test) - mean) / std, axis=1)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)
