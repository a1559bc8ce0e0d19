"""TRELLIS v1 backend (microsoft/TRELLIS-image-large, `TrellisImageTo3DPipeline`): one or several
photos of an object -> textured GLB (+ the raw 3D Gaussians as PLY).

Upstream references (github.com/microsoft/TRELLIS):
- trellis/pipelines/trellis_image_to_3d.py: `TrellisImageTo3DPipeline.from_pretrained(path)`,
  `preprocess_image`, `run(image, seed, sparse_structure_sampler_params, slat_sampler_params,
  formats, preprocess_image)`, `run_multi_image(images, ..., mode='stochastic'|'multidiffusion')`,
  `_init_image_cond_model` (torch.hub DINOv2), `rembg_session` (rembg 'u2net').
- trellis/pipelines/base.py: `Pipeline.from_pretrained` reads `<path>/pipeline.json` and loads each
  args.models entry with models.from_pretrained(f"{path}/{v}"); `.cuda()`.
- trellis/utils/postprocessing_utils.py: `to_glb(app_rep, mesh, simplify=0.95, fill_holes=True,
  fill_holes_max_size=0.04, texture_size=1024, debug=False, verbose=True) -> trimesh.Trimesh`.
- trellis/utils/render_utils.py: `render_video(sample, resolution, bg_color, num_frames, r, fov)`.
- trellis/representations/gaussian/gaussian_model.py: `Gaussian.save_ply(path)`.
- example.py / app.py: the call sequence (from_pretrained -> cuda -> run -> to_glb -> export).

Precision: the checkpoints' own configs carry `use_fp16` (the `_fp16` in their names); upstream
never calls `.half()` on the pipeline, so neither do we.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.backends.gpu import weights
from serve_app.backends.gpu.base import GpuBackend
from serve_app.backends.gpu.images import glb_bytes, mesh_counts, prepare_images, synthetic_object
from serve_app.backends.gpu.options import check_image_count, effective_simplify, sampler_overrides
from serve_app.backends.gpu.paths import (
    checkpoint_files,
    missing_files,
    raise_if_missing,
    read_pipeline_config,
    redirect_torch_hub,
)
from serve_app.backends.gpu.torch_helpers import Stopwatch, report_progress
from serve_app.errors import BackendUnavailable, InvalidInput
from serve_app.settings import Settings

log = logging.getLogger(__name__)

ToGlb = Callable[..., Any]
RenderPreview = Callable[[Any], np.ndarray]

DINOV2_REPO = "facebookresearch/dinov2"


def dinov2_checkpoint_name(model_name: str) -> str:
    """File torch.hub stores a DINOv2 hub model's weights under.

    dinov2/hub/backbones.py names them f"{_make_dinov2_model_name(arch, patch, registers)}
    _pretrain.pth", e.g. 'dinov2_vitl14_reg' (4 registers) -> 'dinov2_vitl14_reg4_pretrain.pth'."""
    if model_name.endswith("_reg"):
        return f"{model_name[: -len('_reg')]}_reg4_pretrain.pth"
    return f"{model_name}_pretrain.pth"


@dataclass(frozen=True)
class TrellisWeights:
    """Where each part of TRELLIS v1 lives locally."""

    model_dir: Path
    dinov2_repo_dir: Path
    dinov2_checkpoint: Path
    u2net_model: Path


class TrellisBackend(GpuBackend):
    """TRELLIS-image-large: single and multi-image, Gaussian-baked textures."""

    name = "trellis"
    label = "TRELLIS"
    oom_hint = "try fewer images or a GPU with more memory (16 GB or more)"

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: Any | None = None,
        to_glb: ToGlb | None = None,
        render_preview: RenderPreview | None = None,
        torch: Any | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(settings, pipeline=pipeline, torch=torch, clock=clock)
        self._to_glb = to_glb
        self._render_preview = render_preview

    # -- weights ------------------------------------------------------------------------------
    def check_weights(self) -> TrellisWeights:
        """Every file `from_pretrained`, DINOv2 and rembg will open, or BackendUnavailable."""
        model_dir = self.paths.trellis_dir
        config = read_pipeline_config(model_dir, self.label)
        args = config["args"]
        missing: list[Path] = []
        for ref in args["models"].values():
            missing += missing_files(model_dir, checkpoint_files(str(ref)))
        cond_model = args.get("image_cond_model")
        if not isinstance(cond_model, str) or not cond_model.startswith("dinov2_"):
            raise BackendUnavailable(
                f"{self.label}: unsupported image_cond_model {cond_model!r} in "
                f"{model_dir / 'pipeline.json'} (expected a DINOv2 torch.hub model name)",
                code="weights_invalid",
            )
        hub_dir = self.paths.torch_home / "hub"
        repo_dir = hub_dir / weights.DINOV2_HUB_DIRNAME
        checkpoint = hub_dir / "checkpoints" / dinov2_checkpoint_name(cond_model)
        missing += missing_files(repo_dir, ["hubconf.py"])
        missing += missing_files(checkpoint.parent, [checkpoint.name])
        u2net = self.paths.u2net_file
        missing += missing_files(u2net.parent, [u2net.name])
        raise_if_missing(self.label, missing)
        return TrellisWeights(model_dir, repo_dir, checkpoint, u2net)

    # -- loading ------------------------------------------------------------------------------
    def _load_pipeline(self, torch: Any, plan: TrellisWeights) -> Any:
        # Heavy imports only here: the base install has no torch and no TRELLIS.
        import rembg
        from trellis.pipelines import TrellisImageTo3DPipeline
        from trellis.utils import postprocessing_utils, render_utils

        # _init_image_cond_model calls torch.hub.load('facebookresearch/dinov2', name,
        # pretrained=True); point it at the local checkout (weights come from $TORCH_HOME).
        with redirect_torch_hub(torch.hub, {DINOV2_REPO: plan.dinov2_repo_dir}):
            pipeline = TrellisImageTo3DPipeline.from_pretrained(str(plan.model_dir))
        pipeline.cuda()
        # preprocess_image creates this lazily on the first photo without alpha; doing it now
        # moves the ONNX load (from $U2NET_HOME) into the cold start, as app.py's preload does.
        pipeline.rembg_session = rembg.new_session("u2net")
        if self._to_glb is None:
            self._to_glb = postprocessing_utils.to_glb
        if self._render_preview is None:

            def render(gaussian: Any) -> np.ndarray:
                frames = render_utils.render_video(
                    gaussian, resolution=512, num_frames=1, verbose=False
                )
                return np.asarray(frames["color"][0])

            self._render_preview = render
        return pipeline

    def _warm_up(self, pipeline: Any) -> None:
        # Pipeline defaults from pipeline.json; exercises DINOv2, both flow models, spconv and
        # attention kernels. to_glb (texture baking, ~2500 optimiser steps) is not warmed.
        image = pipeline.preprocess_image(synthetic_object())
        pipeline.run(image, seed=0, formats=["gaussian", "mesh"], preprocess_image=False)

    # -- generation ------------------------------------------------------------------------------
    def _validate(self, images: Sequence[Image.Image], options: GenerationOptions) -> None:
        check_image_count(images, self.settings, multi=True, backend=self.name)
        if options.resolution is not None:
            raise InvalidInput(
                "option 'resolution' is a TRELLIS.2 option; TRELLIS (v1) works at one fixed "
                "resolution: drop it or use backend 'trellis2'",
                code="unsupported_option",
            )

    def _generate(
        self,
        pipeline: Any,
        images: Sequence[Image.Image],
        options: GenerationOptions,
        progress: ProgressCallback,
        watch: Stopwatch,
    ) -> GeneratedAsset:
        report_progress(progress, 0.02, "removing background")
        with watch.stage("preprocess"):
            prepared = prepare_images(images, options.remove_background, pipeline.preprocess_image)

        report_progress(progress, 0.1, "sampling")
        # Upstream's sampler params take "steps" and "cfg_strength"; one `guidance` sets both
        # stages (pipeline.json defaults apply when unset).
        kwargs: dict[str, Any] = {
            "seed": options.seed,
            "sparse_structure_sampler_params": sampler_overrides(options, "cfg_strength"),
            "slat_sampler_params": sampler_overrides(options, "cfg_strength"),
            # app.py decodes only these two: the radiance field is not used for export.
            "formats": ["gaussian", "mesh"],
            "preprocess_image": False,
        }
        with watch.stage("sampling"):
            if len(prepared) == 1:
                outputs = pipeline.run(prepared[0], **kwargs)
            else:
                outputs = pipeline.run_multi_image(
                    prepared, mode=options.multi_image_mode, **kwargs
                )
        gaussian = outputs["gaussian"][0]
        mesh = outputs["mesh"][0]

        report_progress(progress, 0.5, "baking texture")
        raw_faces = int(mesh.faces.shape[0])
        simplify = effective_simplify(options.simplify, options.face_limit, raw_faces)
        to_glb = self._to_glb
        if to_glb is None:
            raise BackendUnavailable(
                f"{self.label}: no GLB exporter loaded", code="backend_not_loaded"
            )
        with watch.stage("export"):
            glb_mesh = to_glb(
                gaussian, mesh, simplify=simplify, texture_size=options.texture_size, verbose=False
            )
            glb = glb_bytes(glb_mesh)

        report_progress(progress, 0.9, "saving gaussians")
        extra: dict[str, bytes] = {}
        ply = _gaussian_ply(gaussian)
        if ply is not None:
            extra["gaussians.ply"] = ply
        stats: dict[str, float | int | str] = {
            "backend": self.name,
            "seed": options.seed,
            "images": len(prepared),
            "raw_faces": raw_faces,
            "simplify": round(simplify, 4),
            "texture_size": options.texture_size,
            **mesh_counts(glb_mesh),
        }
        if len(prepared) > 1:
            stats["multi_image_mode"] = options.multi_image_mode
        return GeneratedAsset(
            glb=glb, extra_files=extra, preview_png=self._preview(gaussian), stats=stats
        )

    def _preview(self, gaussian: Any) -> bytes | None:
        """A front view of the Gaussians; None (the worker renders the GLB) when that fails."""
        if self._render_preview is None:
            return None
        try:
            frame = self._render_preview(gaussian)
            buf = io.BytesIO()
            Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="PNG")
            return buf.getvalue()
        except Exception:  # a preview is a nicety; the asset is already good
            log.warning("TRELLIS preview render failed; the worker will render one", exc_info=True)
            return None


def _gaussian_ply(gaussian: Any) -> bytes | None:
    """The Gaussians as a 3DGS-style PLY via upstream `save_ply` (it only writes to a path)."""
    try:
        with tempfile.TemporaryDirectory(prefix="photo3d-ply-") as tmp:
            path = Path(tmp) / "gaussians.ply"
            gaussian.save_ply(str(path))
            return path.read_bytes()
    except Exception:  # the GLB is the product; a failed extra file is logged, not fatal
        log.warning("saving gaussians.ply failed", exc_info=True)
        return None
