"""The removal benchmark's harness (benchmarks/removal.py) on one case: the set loads, every
measure is computed, the contact sheet is written. It checks the harness, not the scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cv2")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[1]


def test_the_set_has_twenty_cases_on_licensed_photos_under_three_megabytes():
    data = json.loads((ROOT / "tests" / "data" / "removal" / "masks.json").read_text())
    assert len(data["cases"]) >= 20
    assert all(data["photos"][case["photo"]]["licence"] for case in data["cases"].values())
    folder = ROOT / "tests" / "data"
    assert sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) < 3 * 2**20
    for name in data["photos"]:
        assert (folder / "removal" / f"{name}.jpg").is_file(), name


def test_one_case_through_every_method_writes_scores_and_a_sheet(tmp_path):
    sheet, scores = tmp_path / "sheet.png", tmp_path / "scores.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "removal.py"), "--cases", "text_symbol", "--sheet", str(sheet), "--json", str(scores)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(scores.read_text())
    for method in ("telea", "pypatchmatch", "ours"):
        case = results["cases"]["text_symbol"][method]
        assert set(case) >= {"psnr_db", "texture", "texture_band", "seam", "foreign", "ring", "time_s", "cpu_s"}
        assert 0 <= case["foreign"] <= 1 and 0 <= case["ring"] <= 1 and case["seam"] > 0
    from PIL import Image

    assert Image.open(sheet).size == (5 * 224, 14 + 238)
    assert "| ours |" in done.stdout
