"""The CPU backend's optional learned matte (PHOTO3D_CPU_MATTE=u2net): a local u2net.onnx on
onnxruntime, never downloaded.

No U2-Net weights can reach this machine, so every test here runs a stand-in network built
with `onnx` in the test: it has U2-Net's input and output (1x3x320x320 in, 1x1x320x320 first
output) and answers with the photo's normalised red channel. That proves the plumbing (the
file is found and opened, the photo goes in as rembg prepares it, in RGB order and the right
way up, the answer comes back at the photo's size and decides the mask, errors say what to
do); it says nothing about how good U2-Net's masks are (docs/cpu-backend.md)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from serve_app.backends.base import GenerationOptions
from serve_app.backends.cpu import CPUBackend
from serve_app.backends.cpu.matte import LearnedMatte
from serve_app.backends.cpu.segment import segment_image
from serve_app.backends.gpu import weights
from serve_app.errors import BackendUnavailable
from serve_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# The object: a red box, off-centre in a photo that is wider than tall.
WIDTH, HEIGHT = 300, 200
BOX = (slice(60, 150), slice(40, 140))  # rows, columns


def stand_in_u2net(path: Path) -> Path:
    """A stand-in for u2net.onnx (named as such): U2-Net's shapes, red channel out. Also a
    second output, as U2-Net has seven side outputs and rembg reads the first."""
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])
    first = helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])
    side = helper.make_tensor_value_info("d1", TensorProto.FLOAT, [1, 1, 320, 320])
    ints = [
        helper.make_tensor(name, TensorProto.INT64, [1], [value])
        for name, value in (("start", 0), ("end", 1), ("axis", 1))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["input.1", "start", "end", "axis"], ["d0"]),
            helper.make_node("Neg", ["d0"], ["d1"]),
        ],
        "stand_in_u2net",
        [image],
        [first, side],
        initializer=ints,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def box_photo(seed: int = 0) -> np.ndarray:
    """A red box on a blue-grey wall with noise."""
    rng = np.random.default_rng(seed)
    picture = np.empty((HEIGHT, WIDTH, 3), np.float32)
    picture[:] = (70, 90, 150)
    picture[BOX] = (200, 40, 30)
    picture += rng.normal(0, 4, picture.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def box_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[BOX] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def u2net_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("weights") / "u2net"
    stand_in_u2net(home / weights.U2NET_FILENAME)
    return home


def test_the_matte_comes_back_at_the_photos_size_the_right_way_up(u2net_home: Path) -> None:
    matte = LearnedMatte.load(u2net_home / weights.U2NET_FILENAME)
    alpha = matte(box_photo())
    assert alpha.shape == (HEIGHT, WIDTH) and alpha.dtype == np.uint8
    # Stretched to the full range, as rembg does: the red box is opaque, the wall clear.
    assert alpha[BOX].mean() > 180 and alpha[~box_mask()].mean() < 40
    # In BGR order the wall (more blue than red) would have been the object.
    assert iou(alpha >= 128, box_mask()) > 0.95


def test_segmentation_trusts_the_learned_matte_like_an_alpha_channel(u2net_home: Path) -> None:
    matte = LearnedMatte.load(u2net_home / weights.U2NET_FILENAME)
    photo = Image.fromarray(box_photo())
    learned = segment_image(photo, matte=matte, debug=True)
    assert learned.method == "learned"
    assert iou(learned.mask, box_mask()) > 0.95
    assert learned.debug["learned_matte"].shape == (HEIGHT, WIDTH)
    # A photo with its own transparency keeps it: the network is not asked.
    cutout = np.dstack([box_photo(), np.where(box_mask(), 255, 0).astype(np.uint8)])
    assert segment_image(Image.fromarray(cutout, "RGBA"), matte=matte).method == "alpha"
    # Without a matte the same photo goes through the colour segmentation.
    assert segment_image(photo).method == "grabcut"


def test_the_backend_uses_the_matte_when_configured(u2net_home: Path) -> None:
    settings = Settings(cpu_matte="u2net", u2net_home=u2net_home)
    backend = CPUBackend(settings)
    backend.load()
    asset = backend.generate(
        [Image.fromarray(box_photo())], GenerationOptions(), lambda fraction, stage: None
    )
    assert asset.stats["segmentation"] == "learned"
    assert asset.mask_png is not None
    with Image.open(io.BytesIO(asset.mask_png)) as mask_image:
        mask = np.asarray(mask_image) > 127
    # The backend works on the photo at up to 2x the texture size; the box scales with it.
    assert mask.shape[1] / mask.shape[0] == pytest.approx(WIDTH / HEIGHT, rel=0.01)
    expected = np.asarray(
        Image.fromarray(box_mask()).resize((mask.shape[1], mask.shape[0]), Image.NEAREST)
    )
    assert iou(mask, expected) > 0.95
    # Off by default: no weights needed, no network opened.
    default = CPUBackend(Settings())
    default.load()
    assert default.matte is None


def test_missing_weights_or_runtime_say_what_to_do(
    tmp_path: Path, u2net_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = CPUBackend(Settings(cpu_matte="u2net", u2net_home=tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailable) as missing:
        backend.load()
    assert missing.value.code == "matte_weights_missing"
    assert str(tmp_path / "nowhere" / "u2net.onnx") in missing.value.message
    assert "photo3d weights fetch u2net" in missing.value.message
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(BackendUnavailable) as no_runtime:
        LearnedMatte.load(u2net_home / weights.U2NET_FILENAME)
    assert no_runtime.value.code == "matte_runtime_missing"
    assert "photo3d[matte]" in no_runtime.value.message


def test_weights_fetch_and_verify_know_the_file(u2net_home: Path) -> None:
    assert "u2net" in weights.model_names()
    assert weights.expected_files("u2net") == ["u2net/u2net.onnx"]
    root = str(u2net_home.parent)
    # The stand-in is the right file in the right place, but not U2-Net: its md5 differs.
    assert run_cli("weights", "verify", "u2net", "--dest", root, "--no-hashes").returncode == 0
    checked = run_cli("weights", "verify", "u2net", "--dest", root)
    assert checked.returncode == 1 and "u2net/u2net.onnx" in checked.stdout + checked.stderr


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`photo3d ARGS` with only PATH, PYTHONPATH and `env` in its environment."""
    return run_python("-m", "serve_app.cli", *args, **env)


def run_python(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
    )


def test_generate_debug_dir_shows_the_learned_matte(tmp_path: Path, u2net_home: Path) -> None:
    photo = tmp_path / "box.png"
    Image.fromarray(box_photo()).save(photo)
    debug = tmp_path / "debug"
    result = run_cli(
        "generate",
        str(photo),
        "-q",
        "--output",
        str(tmp_path / "box.glb"),
        "--debug-dir",
        str(debug),
        PHOTO3D_CPU_MATTE="u2net",
        PHOTO3D_U2NET_HOME=str(u2net_home),
    )
    assert result.returncode == 0, result.stderr
    assert {"mask.png", "overlay.png", "learned_matte.png"} <= {p.name for p in debug.iterdir()}
    with Image.open(debug / "learned_matte.png") as learned:
        assert learned.size == (WIDTH, HEIGHT)


def test_matte_speed_bench_times_a_network_of_u2nets_size(tmp_path: Path) -> None:
    """bench/matte_speed.py without weights: U2-Net's layers with random weights. Torch counts
    44,009,869 parameters in U2NET(3, 1) of xuebinqin/U-2-Net's model/u2net.py; the same count
    here means every convolution is there with its shape (the cost does not depend on the
    weights' values)."""
    photo = tmp_path / "box.png"
    Image.fromarray(box_photo()).save(photo)
    bench = str(ROOT / "bench" / "matte_speed.py")
    result = run_python(bench, str(photo), "--runs", "1", "--no-pin")
    assert result.returncode == 0, result.stderr
    assert "(44,009,869 parameters)" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| box.png |"))
    colour, learned = (float(cell) for cell in row.strip("| ").split("|")[2:4])
    assert colour > 0 and learned > 0
