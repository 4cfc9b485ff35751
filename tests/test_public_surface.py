"""The supported surface: ``dist_quant.__all__``, the claims document ``verify`` cites, and the
core working without matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import dist_quant
from dist_quant.plot.command import plot
from dist_quant.verify.command import ALL_CLAIMS, claim_id, verify

ROOT = Path(__file__).resolve().parents[1]


def test_all_lists_importable_supported_names():
    assert len(set(dist_quant.__all__)) == len(dist_quant.__all__)
    for name in dist_quant.__all__:
        assert getattr(dist_quant, name) is not None, name
    for name in ("get_compressor", "DecoupledMomentumSGD", "coupled_equivalent", "coupled_sgd",
                 "decay_param_groups", "LRSchedule", "ConfigError", "PayloadError",
                 "NonFiniteGradientError", "TrainConfig"):
        assert name in dist_quant.__all__
    assert {"qsgd", "terngrad", "topk", "randk"} <= set(dist_quant.available_compressors())


def test_claims_document_states_every_claim_verify_checks():
    text = (ROOT / "docs" / "claims.md").read_text()
    stated = set(re.findall(r"^- \*\*(\w+)\*\*", text, flags=re.M))
    checked = {claim_id(check) for check in ALL_CLAIMS}
    assert checked == stated, (checked ^ stated)
    assert "docs/claims.md" in CliRunner().invoke(verify, ["--help"]).output


def test_core_runs_without_matplotlib_and_plot_says_how_to_install_it(monkeypatch, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import dist_quant, dist_quant.train, dist_quant.sweep, dist_quant.verify.command\n"
            "import dist_quant.analysis.predict, dist_quant.cli")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "dist_quant.plot.figures", None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    result = CliRunner().invoke(plot, [str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "pip install 'dist-quant[plot]'" in result.output
