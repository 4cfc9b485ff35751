"""The README and the documentation site: what a reader runs exists, what the nav names exists.

``mkdocs build --strict`` (run by .ci/run with the docs extra) checks the site's links and API
references; these checks need no mkdocs and run with the tests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import dist_quant
import dist_quant.hooks
from dist_quant.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, continuation lines joined."""
    out, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        out.append(line)
    return out


def dist_quant_commands(text: str) -> list[list[str]]:
    """Each ``dist-quant ...`` command of the code blocks, split, its comment dropped."""
    found = []
    for line in code_lines(text):
        line = line.removeprefix("$ ")
        for part in re.split(r"&&|;", line):
            part = part.split("  #")[0].strip()
            if part.startswith("dist-quant ") and not part.split()[1].endswith(":"):
                found.append(shlex.split(part))   # (a line of output names its command:)
    return found


def test_readme_fits_and_keeps_its_two_setup_commands_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    dollar = [line for line in text.splitlines() if re.match(r"^ *\$", line)]
    assert len(dollar) >= 2
    first, second = (re.sub(r"^ *\$ *", "", line) for line in dollar[:2])
    assert first.startswith("python3 -m venv .venv") and first.endswith("&& dist-quant train")
    assert second.startswith("python3 -m venv .venv")
    assert second.endswith("python -m pytest -q") and "'.[dev]'" in second


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_dist_quant_command_names_a_command_and_its_options(path):
    for argv in dist_quant_commands(path.read_text()):
        sub = argv[1]
        assert sub in COMMANDS, f"{path.name}: {' '.join(argv)}: no command {sub!r}"
        command = main.get_command(None, sub)
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        known |= {"-h", "--help"}
        for token in argv[2:]:
            if token.startswith("-") and token not in ("-", "--"):
                option = token.split("=")[0]
                assert option in known, f"{path.name}: {' '.join(argv)}: no option {option}"


def test_files_the_readme_runs_exist():
    text = README.read_text()
    for rel in ("examples/cnn_shapes.py", "launch/docker-host.sh", "docker-compose.yml"):
        assert rel in text and (ROOT / rel).is_file(), rel
    for link in re.findall(r"\]\(([^)#]+\.md)[^)]*\)", text):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_every_page_exists_and_is_in_the_nav():
    yaml = pytest.importorskip("yaml", reason="pyyaml (a dev dependency) reads mkdocs.yml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    nav = list(pages(config["nav"]))
    for page in nav:
        assert (DOCS / page).is_file(), f"the nav names {page}, which does not exist"
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.name not in nav)
    assert not missing, f"pages not reachable from the nav of mkdocs.yml: {missing}"


def test_every_train_option_is_documented():
    text = (DOCS / "training.md").read_text()
    command = main.get_command(None, "train")
    for param in command.params:
        long = [o for o in param.opts if o.startswith("--") and o != "--help"]
        for opt in long:
            assert f"`{opt}" in text, f"docs/training.md does not document {opt}"


def test_the_api_page_covers_the_public_surface_only():
    text = (DOCS / "api.md").read_text()
    refs = re.findall(r"^::: (\S+)", text, flags=re.M)
    for name in dist_quant.__all__:
        if name in dist_quant.hooks.__all__:   # documented with their module
            assert "dist_quant.hooks" in refs and name in text, f"docs/api.md lacks {name}"
            continue
        assert f"dist_quant.{name}" in refs, f"docs/api.md has no ::: dist_quant.{name}"
    public = {f"dist_quant.{name}" for name in dist_quant.__all__} | {"dist_quant.hooks"}
    assert set(refs) <= public, f"internal paths in docs/api.md: {sorted(set(refs) - public)}"
