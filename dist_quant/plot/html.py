"""``report.html``: the report as one self-contained page that a browser opens from disk.

The page is ``report.md`` turned into HTML (headings, paragraphs, lists, tables, code blocks,
``**bold**``, ``` `code` ``` and links: the subset :mod:`dist_quant.plot.report` writes), with
every figure inline as a base64 PNG (``data:`` URI), so the page needs no server and no file
beside it; each figure links to its PNG for a full-size view. A method's name in the first
cell of a table row carries a swatch of its colour in the figures. No script, no external
style sheet, no font: the page looks the same offline.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.7em; overflow-x: auto; font-size: 0.85em;
      white-space: pre-wrap; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
          vertical-align: -0.1em; border-radius: 2px; }
"""

IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
CAPTIONS = {
    "to_target": "Time to the target: one mark per method at the mean over seeds, the bar its "
                 "min-max, with the speed-up over DDP fp32.",
    "accuracy_vs_time": "Test accuracy against wall time: mean over seeds (bold), min-max band, "
                        "each seed (thin).",
    "accuracy_vs_bytes": "Test accuracy against cumulative MB sent, uplink and up + down.",
    "time_per_phase": "Mean time per step in each phase, mean over seeds.",
    "scaling": "Communication per step against W: measured and the link model.",
}


def inline(text: str) -> str:
    """Escaped text with ``**bold**``, ``` `code` ``` and ``[text](href)``."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)",
                  lambda m: f'<a href="{html.escape(m[2])}">{m[1]}</a>', out)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_html(lines: list[str], colours: dict[str, str]) -> str:
    head, align, body = cells(lines[0]), cells(lines[1]), [cells(x) for x in lines[2:]]
    right = [a.endswith(":") for a in align]
    out = ["<table>", "<tr>" + "".join(f"<th>{inline(h)}</th>" for h in head) + "</tr>"]
    for row in body:
        tds = []
        for i, c in enumerate(row):
            text = inline(c)
            if i == 0 and c in colours:
                text = f'<span class="swatch" style="background:{colours[c]}"></span>{text}'
            tds.append(f'<td class="num">{text}</td>' if i < len(right) and right[i]
                       else f"<td>{text}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    return "\n".join(out + ["</table>"])


def figure_html(alt: str, src: str, out: Path) -> str:
    path = out / src
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = CAPTIONS.get(Path(src).stem, alt)
    return (f'<figure id="{html.escape(Path(src).stem)}"><a href="{html.escape(src)}">'
            f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def markdown_to_html(text: str, out: Path, colours: dict[str, str]) -> str:
    """The body of the page from ``report.md``'s text; images are read from ``out``."""
    lines = text.splitlines()
    parts: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            parts.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) +
                         "</code></pre>")
            i = j + 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            parts.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            parts.append(table_html(lines[i:j], colours))
            i = j
        elif IMAGE.match(line.strip()):
            m = IMAGE.match(line.strip())
            parts.append(figure_html(m["alt"], m["src"], out))
            i += 1
        elif line.startswith("- "):
            j = i
            items = []
            while j < len(lines) and lines[j].startswith("- "):
                items.append(f"<li>{inline(lines[j][2:])}</li>")
                j += 1
            parts.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            i = j
        else:
            j = i
            while (j < len(lines) and lines[j].strip()
                   and not lines[j].startswith(("#", "|", "- ", "```"))
                   and not IMAGE.match(lines[j].strip())):
                j += 1
            parts.append("<p>" + inline(" ".join(x.strip() for x in lines[i:j])) + "</p>")
            i = j
    return "\n".join(parts)


def write_html(report_md: Path, colours: dict[str, str]) -> Path:
    """``report.html`` beside ``report_md``, from its text and the PNGs it names."""
    out = report_md.parent
    text = report_md.read_text()
    title = next((x[2:].strip() for x in text.splitlines() if x.startswith("# ")), "Report")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + markdown_to_html(text, out, colours)
            + f'\n<p><a href="{report_md.name}">{report_md.name}</a></p>\n</body>\n</html>\n')
    path = out / "report.html"
    path.write_text(page)
    return path
