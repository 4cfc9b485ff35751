"""What a user may read of a faulted run: dist_quant's own sentence first, naming the rank and
what to do; the backend's raw words (gloo, torch, the OS) only after it, or in the log."""

from __future__ import annotations

import re

# words of gloo's, torch's and Python's own error text (never written by dist_quant itself)
RAW = ("GLHF", "This is typically caused", "pair.cc", "gloo/transport", ".cc:", ".cpp:",
       "DistBackendError", "DistNetworkError", "Traceback", "RuntimeError:", "ChildFailedError",
       "torch.distributed.elastic", "c10d::")
# a line of dist_quant's own: its prefix, then a sentence of at least three words
OWN = re.compile(r"^(dist_quant( rank \d+)?|dist-quant [a-z]+|Error): (?P<say>.*)$")


def raw_escapes(text: str) -> list[str]:
    """The lines of ``text`` that carry raw backend text without a dist_quant sentence before
    it (a sentence: dist_quant's prefix, then three words or more before the first raw word)."""
    bad = []
    for line in text.splitlines():
        hits = [line.find(w) for w in RAW if w in line]
        if not hits:
            continue
        m = OWN.match(line)
        before = line[m.start("say"):min(hits)] if m else ""
        if len(re.findall(r"[A-Za-z]{2,}", before)) < 3:
            bad.append(line)
    return bad
