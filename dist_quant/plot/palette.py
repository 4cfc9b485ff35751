"""One colour and line style per method, the same in every figure of one ``dist-quant plot``.

Colours from Paul Tol's colour-blind-safe schemes (https://personal.sron.nl/~pault/): the DDP
baselines take the cool family (blues, cyan, teal, grey) and dashed lines, the parameter
server's methods the warm family (red, orange, gold, wine, magenta, purple, olive) and solid
lines, so the two families part by line style as well as hue; within a family each method
also has its own marker, for readers who tell neighbouring hues apart with difficulty. A family
with more methods than colours starts again with dotted lines. DDP fp32, the reference of
every speed-up, is first and darkest of its family.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_quant.plot.runs import Run

DDP_COLOURS = ("#004488", "#33BBEE", "#009988", "#555555", "#88CCEE", "#332288")
PS_COLOURS = ("#CC3311", "#EE7733", "#DDAA33", "#882255", "#EE3377", "#AA4499", "#999933")
DDP_MARKERS = ("s", "D", "v", "^", "P", "X")
PS_MARKERS = ("o", "^", "D", "v", "P", "X", "*")
# the phases of a step: greys, so that no phase looks like a method
PHASE_COLOURS = {"compute": "#444444", "encode": "#8C8C8C", "communicate": "#E4E4E4",
                 "decode": "#BBBBBB", "update": "#111111"}
PHASE_HATCH = {"encode": "..", "communicate": "///", "decode": "xx"}


@dataclass(frozen=True)
class Style:
    colour: str
    linestyle: str
    marker: str
    family: str   # "DDP" or "PS"

    def line(self) -> dict:
        return {"color": self.colour, "linestyle": self.linestyle}


def styles(order: list[str], first_run: dict[str, Run]) -> dict[str, Style]:
    """``{method: Style}`` for the methods in ``order`` (reading order), each method's family
    read from its first run."""
    out: dict[str, Style] = {}
    count = {"DDP": 0, "PS": 0}
    for name in order:
        family = "DDP" if first_run[name].config.get("method") == "ddp" else "PS"
        colours = DDP_COLOURS if family == "DDP" else PS_COLOURS
        i = count[family]
        count[family] += 1
        dashed = "--" if family == "DDP" else "-"
        markers = DDP_MARKERS if family == "DDP" else PS_MARKERS
        out[name] = Style(colours[i % len(colours)], dashed if i < len(colours) else ":",
                          markers[i % len(markers)], family)
    return out
