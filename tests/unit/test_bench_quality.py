"""bench/quality.py runs on a subset (views by index, a geometry override) and reports both
backends side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
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
    bad = subprocess.run(
        [*command[:3], "--segment=NOT_A_CONSTANT=1"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert "segment.py or backdrop.py" in bad.stderr


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


def test_silhouette_errors_split_the_rim_from_whole_regions() -> None:
    """The per-case anatomy of a mask's errors: pixels one off along the true outline are
    counted apart from a region that should not be there (a shadow strip)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "bench"))
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    mask = truth.copy()
    mask[10, 10:30] = False  # the top row of the outline lost: 20 missed, all in the rim
    mask[30, 12:18] = True  # one pixel too far below: 6 extra, in the rim
    mask[33:36, 5:35] = True  # a strip apart from the object: 90 extra, none in the rim
    (missed, missed_rim), (extra, extra_rim) = quality.silhouette_errors(mask, truth)
    assert (missed, missed_rim) == (20, 20)
    assert (extra, extra_rim) == (96, 6)
    assert quality.silhouette_errors(truth, truth) == ((0, 0), (0, 0))


def test_quality_bench_cases_table_counts_the_errors(tmp_path: Path) -> None:
    command = capsule_bench(tmp_path, "--size=128", "--views=1", "--methods=cpu", "--cases")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    rows = [
        cells
        for cells in (line.split("|") for line in result.stdout.splitlines())
        if len(cells) == 9 and cells[1].strip() == "capsule" and cells[4].strip() == "cpu"
    ]
    assert len(rows) == 1, result.stdout
    iou, missed, extra = (cell.strip() for cell in rows[0][5:8])
    assert 0.9 < float(iou) <= 1.0
    # "N (R)": R of the N pixels lie in the rim, so R <= N.
    for cell in (missed, extra):
        total, rim = cell.replace("(", "").replace(")", "").split()
        assert 0 <= int(rim) <= int(total)


def test_quality_bench_runs_the_learned_matte_side_by_side(tmp_path: Path) -> None:
    """cpu-u2net: the backend with its optional learned matte, here a stand-in network (no
    U2-Net weights reach this machine), on the same photo as cpu."""
    from tests.unit.test_cpu_matte import stand_in_u2net

    matte = stand_in_u2net(tmp_path / "u2net" / "u2net.onnx")
    command = capsule_bench(tmp_path, "--size=128", "--views=1", "--styles=photo-wood")
    command.remove("--styles=transparent")
    result = subprocess.run(
        [*command, "--methods=cpu,cpu-u2net", f"--matte={matte}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| photo-wood |")]
    assert [row.split("|")[2].strip() for row in rows] == ["cpu", "cpu-u2net"]
    for bad, says in (
        (["--methods=cpu-u2net"], "cpu-u2net needs it"),
        (["--methods=cpu-u2net", f"--matte={tmp_path / 'none.onnx'}"], "does not exist"),
    ):
        refused = subprocess.run([*command, *bad], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and says in refused.stderr
