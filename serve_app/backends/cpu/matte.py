"""An optional learned matte for the CPU backend: rembg's U2-Net (`u2net.onnx`) on
onnxruntime, read from a local file and never downloaded.

Off by default (`PHOTO3D_CPU_MATTE=colour`): the colour segmentation needs no weights. With
`PHOTO3D_CPU_MATTE=u2net` the CPU backend asks the network for the object's matte on photos
without transparency and then treats it as the photo's own alpha channel, the path that is
good on cut-outs (docs/cpu-backend.md). The file is the one TRELLIS uses
(`<weights_dir>/u2net/u2net.onnx`, or `PHOTO3D_U2NET_HOME`); `photo3d weights fetch u2net`
puts it there where the internet is reachable. Needs the `matte` extra (onnxruntime).

The pre- and post-processing follow rembg's U2-Net session (rembg/sessions/base.py `normalize`,
rembg/sessions/u2net.py `predict`): the photo resized to 320 x 320 (Lanczos), divided by its
brightest value, ImageNet mean and deviation per channel, NCHW float32 in; the first output's
first channel, stretched to 0..1 and resized back to the photo (Lanczos) out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serve_app.errors import BackendUnavailable

INPUT_SIZE = (320, 320)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)


class LearnedMatte:
    """A loaded U2-Net session; call it with an RGB photo to get an 8-bit alpha channel."""

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def load(cls, path: Path) -> LearnedMatte:
        """Open `path` (a U2-Net ONNX file) on one CPU thread; BackendUnavailable with what
        to do when the file or onnxruntime is missing."""
        if not path.is_file():
            raise BackendUnavailable(
                f"PHOTO3D_CPU_MATTE=u2net, but {path} does not exist. Put rembg's u2net.onnx "
                "there (`photo3d weights fetch u2net` where the internet is reachable), or set "
                "PHOTO3D_CPU_MATTE=colour.",
                code="matte_weights_missing",
            )
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendUnavailable(
                "PHOTO3D_CPU_MATTE=u2net needs onnxruntime: pip install 'photo3d[matte]'.",
                code="matte_runtime_missing",
            ) from exc
        options = onnxruntime.SessionOptions()
        # One thread, like the rest of a CPU generation (backend.one_thread_per_generation):
        # the service scales by replicas of one CPU each.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return cls(session, path)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The object's matte of an (H, W, 3) uint8 photo: (H, W) uint8, 255 on the object."""
        height, width = rgb.shape[:2]
        small = np.asarray(
            Image.fromarray(rgb).resize(INPUT_SIZE, Image.Resampling.LANCZOS), dtype=np.float64
        )
        small = small / max(float(small.max()), 1e-6)
        batch = ((small - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)
        prediction = np.asarray(self.session.run(None, {self.input_name: batch})[0])[0, 0]
        low, high = float(prediction.min()), float(prediction.max())
        stretched = (prediction - low) / max(high - low, 1e-6)
        matte = Image.fromarray((stretched * 255).astype(np.uint8), mode="L")
        return np.asarray(matte.resize((width, height), Image.Resampling.LANCZOS))
