"""MNIST-1D, generated procedurally (Greydanus 2020, "Scaling down deep learning").

Each example is one of ten hand-made templates of length 12 (the digits 0..9 drawn as 1-D
curves), put through the paper's chain of random transformations:

1. pad the template with ``p ~ U{36..60}`` zeros on the right (``x + 1e-8`` first, so the
   template itself never reads as "zero" in step 5);
2. dilate: resample the padded signal linearly to ``12 + 60 = 72`` points;
3. scale by ``1 + 0.4 (u - 1/2)``, ``u ~ U[0, 1)``;
4. translate circularly by ``k ~ U{0..47}``;
5. where the signal is exactly zero, replace it by correlated noise
   ``0.25 * gaussian_filter(N(0, 1), sigma=2)`` (reflect at the ends, radius 4 sigma);
6. add iid noise ``N(0, 0.02^2)`` everywhere;
7. shear: subtract ``c * linspace(-1/2, 1/2, 72)`` with ``c = 0.75 (u - 1/2)``;
8. subsample linearly to 40 points.

Templates are whitened (minus mean, divided by std), shifted so they start at 0, divided by 6.
The paper's classifiers reach about 32% (logistic regression), 68% (MLP) and 94% (CNN) on its
4000/1000 split; chance is 10%.

Differences from the reference generator, on purpose: draws come from a
``numpy.random.Generator`` owned by the call (never the global RNG), the whole batch is
transformed at once (vectorised linear interpolation instead of a loop over ``interp1d``), and
train and test are generated as two exactly class-balanced sets (labels ``i mod 10``, shuffled)
instead of one set split 80/20. The statistics of every example are those of the paper; the
particular examples differ from the ``mnist1d`` package's.
"""

from __future__ import annotations

import numpy as np

TEMPLATE_DIGITS = np.array([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
    [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
    [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
    [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
    [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
    [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
    [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
    [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
])

PADDING = (36, 60)          # inclusive range of right padding
SCALE_COEFF = 0.4
MAX_TRANSLATION = 48        # shift k in 0..47
CORR_NOISE_SCALE = 0.25
CORR_NOISE_SIGMA = 2.0
IID_NOISE_SCALE = 2e-2
SHEAR_SCALE = 0.75
FINAL_LENGTH = 40
DATA_SEED = 42              # the paper's seed; the dataset does not depend on the training seed


def templates() -> np.ndarray:
    """The ten whitened templates, shape [10, 12]."""
    x = TEMPLATE_DIGITS - TEMPLATE_DIGITS.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


def resample(x: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of each row's first ``lengths[i]`` values onto ``n`` even points.

    Row ``i`` is read as samples at ``linspace(0, 1, lengths[i])`` and evaluated at
    ``linspace(0, 1, n)``: row by row this is ``np.interp``, done for all rows at once.
    """
    lengths = np.asarray(lengths)
    pos = np.linspace(0.0, 1.0, n)[None, :] * (lengths[:, None] - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), lengths[:, None] - 2)
    frac = pos - lo
    rows = np.arange(x.shape[0])[:, None]
    return x[rows, lo] * (1.0 - frac) + x[rows, lo + 1] * frac


def gaussian_filter1d(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian smoothing along the last axis, ends reflected (``d c b a | a b c d``)."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(radius, radius)], mode="symmetric")
    out = np.zeros_like(x, dtype=np.float64)
    for j, w in enumerate(kernel):
        out += w * padded[..., j:j + x.shape[-1]]
    return out


def transform(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply steps 1-8 of the module docstring to rows of 12-point templates: [m, 12] -> [m, 40]."""
    m, tlen = base.shape
    full = tlen + PADDING[1]
    pad = rng.integers(PADDING[0], PADDING[1] + 1, size=m)
    scale = 1.0 + SCALE_COEFF * (rng.random(m) - 0.5)
    shift = rng.integers(0, MAX_TRANSLATION, size=m)
    corr = CORR_NOISE_SCALE * rng.standard_normal((m, full))
    iid = IID_NOISE_SCALE * rng.standard_normal((m, full))
    shear = SHEAR_SCALE * (rng.random(m) - 0.5)

    padded = np.zeros((m, full))
    padded[:, :tlen] = base + 1e-8
    x = resample(padded, tlen + pad, full) * scale[:, None]
    cols = (np.arange(full)[None, :] - shift[:, None]) % full
    x = x[np.arange(m)[:, None], cols]
    x = np.where(x != 0, x, gaussian_filter1d(corr, CORR_NOISE_SIGMA))
    x = x + iid
    x = x - shear[:, None] * np.linspace(-0.5, 0.5, full)[None, :]
    return resample(x, np.full(m, full), FINAL_LENGTH)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def make_mnist1d(train_size: int = 4000, test_size: int = 1000,
                 seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [N, 40], y_train [N], x_test, y_test), float64 and int64, not standardised."""
    rng = np.random.default_rng(seed)
    base = templates()
    out = []
    for n in (train_size, test_size):
        y = balanced_labels(n, len(base), rng)
        out += [transform(base[y], rng), y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]
