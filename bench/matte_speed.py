"""The cost of the cpu backend's optional learned matte on one core, beside the colour
segmentation it replaces.

    .venv/bin/python bench/matte_speed.py /work/shared/evaldata/photos/*/*.* [--runs 3]
    .venv/bin/python bench/matte_speed.py PHOTOS... --matte weights/u2net/u2net.onnx

Without --matte it times a network built here with U2-Net's layers and random weights: every
convolution, batch norm, pool, resize and join of U2NET(3, 1) in xuebinqin/U-2-Net's
model/u2net.py (Apache-2.0), at rembg's 320 x 320 input. Its masks are meaningless; its cost
is U2-Net's, since onnxruntime runs the same operations on the same shapes whatever the
weights' values. Each photo is decoded like the service does and reduced to --side; each run
times, in this process's CPU time on one core, the colour segmentation (`segment_arrays`) and
the matte's whole call (resize, network, resize back), then the table shows medians.
"""

from __future__ import annotations

import os

# One core: fix the thread pools before numpy / OpenCV start them.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_and_commit  # noqa: E402
from bench.cpu_speed import load_photo  # noqa: E402
from serve_app.backends.cpu.matte import INPUT_SIZE, LearnedMatte  # noqa: E402
from serve_app.backends.cpu.segment import segment_arrays, split_alpha  # noqa: E402
from serve_app.errors import Photo3DError  # noqa: E402


class _Graph:
    """An ONNX graph under construction, with every tensor's (channels, height, width)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.weights: list = []
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.count = 0
        # Trainable parameters as torch counts them: weights and biases of every convolution
        # and the scales and shifts of every batch norm (folded into its convolution here).
        self.parameters = 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def _weight(self, array: np.ndarray) -> str:
        return self._constant(array.astype(np.float32))

    def conv(self, x: str, out: int, kernel: int = 3, dilation: int = 1) -> str:
        """nn.Conv2d(in, out, kernel, padding=dilation, dilation=dilation) (padding 0 at 1x1)."""
        from onnx import helper

        channels, height, width = self.shapes[x]
        scale = np.sqrt(2.0 / (channels * kernel * kernel))
        weight = self._weight(self.rng.normal(0, scale, (out, channels, kernel, kernel)))
        bias = self._weight(np.zeros(out))
        self.parameters += out * channels * kernel * kernel + out
        pad = dilation if kernel == 3 else 0
        y = self._name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, weight, bias],
                [y],
                kernel_shape=[kernel, kernel],
                pads=[pad] * 4,
                dilations=[dilation, dilation],
            )
        )
        self.shapes[y] = (out, height, width)
        return y

    def op(self, op: str, inputs: list[str], shape: tuple[int, int, int], **attrs: object) -> str:
        from onnx import helper

        y = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [y], **attrs))
        self.shapes[y] = shape
        return y

    def rebnconv(self, x: str, out: int, dilation: int = 1) -> str:
        """REBNCONV: conv 3x3, batch norm, ReLU. The batch norm is folded into the convolution,
        as torch's ONNX export of a model in eval mode does."""
        y = self.conv(x, out, 3, dilation)
        self.parameters += 2 * out
        return self.op("Relu", [y], self.shapes[y])

    def pool(self, x: str) -> str:
        """nn.MaxPool2d(2, stride=2, ceil_mode=True)."""
        channels, height, width = self.shapes[x]
        shape = (channels, -(-height // 2), -(-width // 2))
        return self.op("MaxPool", [x], shape, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)

    def upsample_like(self, x: str, like: str) -> str:
        """F.upsample(size=like's, mode='bilinear')."""
        channels = self.shapes[x][0]
        _, height, width = self.shapes[like]
        sizes = self._constant(np.array([1, channels, height, width], np.int64))
        return self.op(
            "Resize",
            [x, "", "", sizes],
            (channels, height, width),
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )

    def _constant(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name("c")
        self.weights.append(numpy_helper.from_array(array, name))
        return name

    def cat(self, *xs: str) -> str:
        channels = sum(self.shapes[x][0] for x in xs)
        _, height, width = self.shapes[xs[0]]
        return self.op("Concat", list(xs), (channels, height, width), axis=1)

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b], self.shapes[a])

    def rsu(self, x: str, depth: int, mid: int, out: int) -> str:
        """RSU-7/6/5/4: an encoder of depth - 2 pooled levels, a dilated bottom, a decoder."""
        hxin = self.rebnconv(x, out)
        levels = [self.rebnconv(hxin, mid)]
        for _ in range(depth - 2):
            levels.append(self.rebnconv(self.pool(levels[-1]), mid))
        bottom = self.rebnconv(levels[-1], mid, dilation=2)
        up = self.rebnconv(self.cat(bottom, levels[-1]), mid)
        for index in range(len(levels) - 2, -1, -1):
            up = self.upsample_like(up, levels[index])
            up = self.rebnconv(self.cat(up, levels[index]), out if index == 0 else mid)
        return self.add(up, hxin)

    def rsu4f(self, x: str, mid: int, out: int) -> str:
        """RSU-4F: dilations 1, 2, 4, 8 instead of pooling."""
        hxin = self.rebnconv(x, out)
        hx1 = self.rebnconv(hxin, mid)
        hx2 = self.rebnconv(hx1, mid, dilation=2)
        hx3 = self.rebnconv(hx2, mid, dilation=4)
        hx4 = self.rebnconv(hx3, mid, dilation=8)
        hx3d = self.rebnconv(self.cat(hx4, hx3), mid, dilation=4)
        hx2d = self.rebnconv(self.cat(hx3d, hx2), mid, dilation=2)
        return self.add(self.rebnconv(self.cat(hx2d, hx1), out), hxin)


def u2net_layers(path: Path, seed: int = 0) -> int:
    """Write an ONNX network with U2NET(3, 1)'s layers and random weights to `path`; its
    parameter count as torch would count U2NET's."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph(seed)
    width, height = INPUT_SIZE
    g.shapes["input.1"] = (3, height, width)
    hx1 = g.rsu("input.1", 7, 32, 64)
    hx2 = g.rsu(g.pool(hx1), 6, 32, 128)
    hx3 = g.rsu(g.pool(hx2), 5, 64, 256)
    hx4 = g.rsu(g.pool(hx3), 4, 128, 512)
    hx5 = g.rsu4f(g.pool(hx4), 256, 512)
    hx6 = g.rsu4f(g.pool(hx5), 256, 512)
    hx5d = g.rsu4f(g.cat(g.upsample_like(hx6, hx5), hx5), 256, 512)
    hx4d = g.rsu(g.cat(g.upsample_like(hx5d, hx4), hx4), 4, 128, 256)
    hx3d = g.rsu(g.cat(g.upsample_like(hx4d, hx3), hx3), 5, 64, 128)
    hx2d = g.rsu(g.cat(g.upsample_like(hx3d, hx2), hx2), 6, 32, 64)
    hx1d = g.rsu(g.cat(g.upsample_like(hx2d, hx1), hx1), 7, 16, 64)
    sides = [g.conv(hx1d, 1)]
    for level in (hx2d, hx3d, hx4d, hx5d, hx6):
        sides.append(g.upsample_like(g.conv(level, 1), sides[0]))
    fused = g.conv(g.cat(*sides), 1, kernel=1)
    outputs = [g.op("Sigmoid", [x], g.shapes[x]) for x in (fused, *sides)]
    graph = helper.make_graph(
        g.nodes,
        "u2net_layers_random_weights",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, height, width])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, height, width])
            for name in outputs
        ],
        initializer=g.weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return g.parameters


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--side", type=int, default=1024, help="longest side; 0 = as is")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--matte", type=Path, help="a real u2net.onnx instead of the layers")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU core")
    args = parser.parse_args()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as folder:
        if args.matte:
            path = args.matte
            network = f"{path} ({path.stat().st_size / 1e6:.1f} MB)"
        else:
            path = Path(folder) / "u2net_layers.onnx"
            count = u2net_layers(path)
            network = f"U2-Net's layers with random weights ({count:,} parameters)"
        matte = LearnedMatte.load(path)
        rows, skipped = [], []
        for photo_path in args.photos:
            rgb, alpha = split_alpha(load_photo(photo_path, args.side))
            if alpha is not None:  # the backend trusts the photo's own alpha: neither runs
                skipped.append(photo_path.name)
                continue
            colour, learned = [], []
            matte(rgb)  # warm-up
            for _ in range(args.runs):
                start = time.process_time()
                with contextlib.suppress(Photo3DError):  # a refusal costs its time too
                    segment_arrays(rgb, None, None)
                colour.append(time.process_time() - start)
                start = time.process_time()
                matte(rgb)
                learned.append(time.process_time() - start)
            rows.append(
                (photo_path.name, rgb.shape, statistics.median(colour), statistics.median(learned))
            )

    print(f"# bench/matte_speed.py {' '.join(sys.argv[1:])}")
    print(f"# {machine_and_commit()}; python {platform.python_version()}")
    print(f"# one core, CPU time, median of {args.runs} runs after one warm-up of the matte")
    print(f"# network: {network}")
    if skipped:
        print(f"# skipped (their own alpha is the mask): {', '.join(skipped)}")
    print("\n| photo | size | colour segmentation s | learned matte s |\n|---|---|---|---|")
    for name, shape, colour_s, learned_s in rows:
        print(f"| {name} | {shape[1]}x{shape[0]} | {colour_s:.3f} | {learned_s:.3f} |")
    colour_all = [r[2] for r in rows]
    learned_all = [r[3] for r in rows]
    print(
        f"| **mean** (max) | | {statistics.mean(colour_all):.3f} ({max(colour_all):.3f}) | "
        f"{statistics.mean(learned_all):.3f} ({max(learned_all):.3f}) |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
