"""The ``text-transformer`` task's data: the English of Python's own documentation topics.

Source. ``pydoc_data.topics.topics`` (shipped with CPython, no download): a dict of topic
name to text. The text is the topics' UTF-8 bytes in sorted name order, one byte a token (a
vocabulary of 256). Its SHA-256 and size are the data's identity (:func:`text_info`): they go
to ``config.json`` under ``"data"``, and a resumed run refuses a text that differs (another
CPython may ship other topics).

Split (fixed, independent of the run's seed): every topic's first ``floor(0.9 n)`` bytes are
training text, its last ``n - floor(0.9 n)`` validation text; the training parts are
concatenated in topic order, and so are the validation parts. So both splits cover every
topic, and no validation byte is ever trained on.

Examples. A window of ``CONTEXT + 1`` consecutive bytes ``b_0 .. b_T`` is one example:
input ``b_0 .. b_{T-1}``, target ``b_1 .. b_T`` (the next byte at every position), both int64
``[T]``. Training windows start every ``CONTEXT // 2`` bytes (half-overlapping), validation
windows every ``CONTEXT`` bytes (each validation byte is predicted once; the first of a window
with no context). Training windows are then put in one fixed random order (seed ``DATA_SEED``),
so that the workers' strided shards mix topics.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from dist_quant.data.dataset import DATA_SEED, Dataset

CONTEXT = 64       # tokens per example
VOCAB = 256        # bytes
TRAIN_FRACTION = 0.9
SOURCE = "pydoc_data.topics"


def topics() -> dict[str, str]:
    """The documentation topics of the running CPython."""
    # the standard library's data module, imported only by the task that reads it
    from pydoc_data.topics import topics as table

    return dict(table)


def split_text(table: dict[str, str]) -> tuple[bytes, bytes, bytes]:
    """(whole text, training text, validation text) by the fixed rule (module docstring)."""
    whole, train, val = [], [], []
    for name in sorted(table):
        b = table[name].encode("utf-8")
        cut = math.floor(TRAIN_FRACTION * len(b))
        whole.append(b)
        train.append(b[:cut])
        val.append(b[cut:])
    return b"".join(whole), b"".join(train), b"".join(val)


def text_info(whole: bytes, train: bytes, val: bytes) -> dict[str, object]:
    """What identifies the text: source, SHA-256 and byte counts."""
    return {"source": SOURCE, "sha256": hashlib.sha256(whole).hexdigest(),
            "bytes": len(whole), "train_bytes": len(train), "validation_bytes": len(val),
            "context": CONTEXT}


def windows(text: bytes, stride: int, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets (int64 ``[N, context]``) of the windows of ``context + 1``
    bytes starting every ``stride`` bytes."""
    data = torch.from_numpy(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    starts = torch.arange(0, len(data) - context, stride)
    idx = starts[:, None] + torch.arange(context + 1)[None]
    win = data[idx]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def load_text(table: dict[str, str] | None = None) -> Dataset:
    """The task's dataset (module docstring); ``table`` defaults to :func:`topics`."""
    whole, train, val = split_text(topics() if table is None else table)
    x, y = windows(train, CONTEXT // 2)
    order = torch.from_numpy(np.random.default_rng(DATA_SEED).permutation(len(x)))
    x_test, y_test = windows(val, CONTEXT)
    return Dataset("text", x[order], y[order], x_test, y_test, VOCAB,
                   info=text_info(whole, train, val))
