"""benchmarks/foundation_cost.py on the CPU with the tiny models: it measures real generalist calls and its figures
follow from what the generalist did (encoder images per call, shares computed from the timings)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("segment_anything")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "foundation_cost.py"


def load_script():
    spec = importlib.util.spec_from_file_location("foundation_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_foundation_cost_table_and_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    rc = load_script().main(["--tiny", "--device", "cpu", "--backends", "sam", "sam_stitch", "--patch-size", "8", "12",
                             "10", "--batch", "2", "--iterations", "2", "--mt-iteration-s", "0.5",
                             "--json", str(out)])
    assert rc == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    # objects over the middle half of each axis: 4 of the 8 D-slices per patch carry a prompt, 2 patches
    assert rows["sam"]["encoder_images_per_call"] == 8
    assert rows["sam_stitch"]["encoder_images_per_call"] == 1  # all 8 small slices fit one mosaic
    for r in rows.values():
        assert r["ms_per_call"] > 0 and r["ms_per_patch"] == pytest.approx(r["ms_per_call"] / 2)
        assert r["share_of_iteration"] == pytest.approx(r["ms_per_call"] / 1000 / (0.5 + r["ms_per_call"] / 1000))
    table = capsys.readouterr().out
    assert "| sam | tiny |" in table and "share of a SemiSAM iteration" in table
