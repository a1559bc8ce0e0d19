"""bench/quality.py runs on a subset (views by index, a geometry override) and reports both
backends side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trimesh

ROOT = Path(__file__).resolve().parents[2]


def capsule_bench(tmp_path: Path, *options: str) -> list[str]:
    """bench/quality.py's command line on one capsule, transparent background, one job."""
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.capsule(height=1.0, radius=0.4).export(meshes / "capsule.obj")
    script = str(ROOT / "bench" / "quality.py")
    return [sys.executable, script, str(meshes), "--styles=transparent", "--jobs=1", *options]


def test_quality_bench_subset_with_geometry_override(tmp_path: Path) -> None:
    command = capsule_bench(tmp_path, "--size=160", "--views=1,4", "--geometry=DEPTH_SCALE_MIN=0.6")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "1 scans × 2 views × 1 backgrounds" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| transparent |")]
    assert [row.split("|")[2].strip() for row in rows] == ["cpu-legacy", "cpu"]
    assert "| capsule |" in result.stdout

    bad = subprocess.run(
        [*command[:3], "--geometry=NOT_A_CONSTANT=1"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "NOT_A_CONSTANT" in bad.stderr


def test_quality_bench_oracles_bound_the_backend(tmp_path: Path) -> None:
    """The bench-only oracles (issue #17's headroom): the best depth multiplier per case is
    at least as good as the backend's own (1.0 is among those tried)."""
    command = capsule_bench(
        tmp_path, "--size=128", "--views=1", "--methods=cpu,oracle-scale,oracle-mirror"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    rows = {
        cells[2].strip(): float(cells[5])
        for cells in (
            line.split("|")
            for line in result.stdout.splitlines()
            if line.startswith("| transparent |")
        )
    }
    assert set(rows) == {"cpu", "oracle-scale", "oracle-mirror"}
    assert rows["oracle-scale"] >= rows["cpu"]
    assert 0.0 < rows["oracle-mirror"] <= 1.0
