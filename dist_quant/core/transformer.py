"""The ``text-transformer`` task's network: a small causal pre-LayerNorm transformer on bytes.

Shape (``d = WIDTH``, ``h = HEADS``, ``L = LAYERS``, context ``T``, vocabulary ``V = 256``)::

    e   = E[x] + s P[:T]                    # E: [V, d] byte embedding, P: sinusoidal table
    for each of L blocks:
        e = e + W_o attn(LN_1(e))           # h heads, causal: position i sees 0..i
        e = e + W_2 gelu(W_1 LN_2(e))       # W_1: d -> 4d, W_2: 4d -> d
    logits = LN_f(e) E^T                    # tied: the output layer is the embedding

``attn`` is ``softmax(q k^T / sqrt(d / h) + M) v`` per head with ``M_ij = -inf`` for
``j > i``. The mask ``M`` and the positional table ``P`` (``P[t, 2k] = sin(t / 10000^(2k/d))``,
``P[t, 2k+1] = cos(...)``, Vaswani et al. 2017) are constant, non-persistent buffers: they are
neither trained nor synchronised nor saved, each replica builds the same. The table is scaled
by ``s = 0.02``, the embedding's initial standard deviation: unscaled, its entries (RMS 0.71)
are 35 times the byte embedding's, so after the first LayerNorm a position is almost all a
block sees, and the model sat on the unigram loss (3.3 nats a byte) for its first 250-300
steps under AdamW at lr 1e-3 to 1e-2 (measured on this task, 2026-12-07) until the embedding
had grown; scaled, the loss is 2.9 after 50 steps. The output is
``[batch, T, V]``: one next-byte prediction per position.

Initialisation (GPT-2's): every Linear and the embedding ``N(0, 0.02^2)``, the two residual
projections of each block (``W_o``, ``W_2``) ``N(0, (0.02 / sqrt(2 L))^2)`` so that the residual
stream's variance does not grow with depth; biases 0, LayerNorm scale 1 and shift 0. Draws
come from the global generator (:class:`dist_quant.ps.task.Task` seeds it from ``(seed, INIT)``).

Size: ``V d + L (12 d^2 + 13 d) + 2 d`` parameters: 360,288 at the defaults (``d = 96``,
``L = 3``, ``h = 4``). No dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HEADS, LAYERS, VOCAB = 96, 4, 3, 256
INIT_STD = 0.02


def sinusoidal_table(length: int, width: int) -> torch.Tensor:
    """``P[t, 2k] = sin(t w_k)``, ``P[t, 2k+1] = cos(t w_k)``, ``w_k = 10000^(-2k/width)``."""
    t = torch.arange(length, dtype=torch.float64)[:, None]
    w = torch.pow(10000.0, -torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(length, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(t * w)
    table[:, 1::2] = torch.cos(t * w)[:, :width // 2]
    return table.float()


class Block(nn.Module):
    """One pre-LayerNorm block: causal self-attention, then the MLP, each residual."""

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        b, t, d = e.shape
        q, k, v = self.qkv(self.ln1(e)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads) + self.mask[:t, :t]
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        e = e + self.proj(a)
        return e + self.out(F.gelu(self.fc(self.ln2(e))))


class ByteTransformer(nn.Module):
    """The network of the module docstring; ``forward(x)``: int64 ``[B, T]`` with
    ``T <= context`` to logits ``[B, T, vocab]``."""

    def __init__(self, context: int, width: int = WIDTH, heads: int = HEADS,
                 layers: int = LAYERS, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.register_buffer("position", INIT_STD * sinusoidal_table(context, width),
                             persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, 0.0, INIT_STD)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            for block in self.blocks:
                for m in (block.proj, block.out):
                    nn.init.normal_(m.weight, 0.0, INIT_STD / math.sqrt(2 * layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x) + self.position[:x.shape[1]]
        for block in self.blocks:
            e = block(e)
        return self.ln_f(e) @ self.embed.weight.t()
