"""TRELLIS.2 backend (microsoft/TRELLIS.2-4B, `Trellis2ImageTo3DPipeline`): one photo -> GLB with
PBR materials (base colour, metallic, roughness, alpha) baked by o_voxel.

Upstream references (github.com/microsoft/TRELLIS.2):
- trellis2/pipelines/trellis2_image_to_3d.py: `Trellis2ImageTo3DPipeline.from_pretrained(path)`,
  `model_names_to_load`, `preprocess_image`, `run(image, num_samples, seed,
  sparse_structure_sampler_params, shape_slat_sampler_params, tex_slat_sampler_params,
  preprocess_image, return_latent, pipeline_type, max_num_tokens)`; pipeline types '512', '1024',
  '1024_cascade', '1536_cascade'; `low_vram` and `default_pipeline_type` from pipeline.json.
- trellis2/pipelines/base.py: models listed in args.models load from f"{path}/{v}", or from the
  hub when `v.count('/') >= 2` (an "external" checkpoint in another repo).
- trellis2/modules/image_feature_extractor.py: `DinoV3FeatureExtractor(model_name)` ->
  transformers `DINOv3ViTModel.from_pretrained(model_name)`.
- trellis2/pipelines/rembg/BiRefNet.py: `BiRefNet(model_name)` ->
  `AutoModelForImageSegmentation.from_pretrained(model_name, trust_remote_code=True)`.
- app.py: resolution "512"/"1024"/"1536" -> pipeline_type "512"/"1024_cascade"/"1536_cascade";
  sampler params "steps", "guidance_strength", "guidance_rescale", "rescale_t".
- README example.py: `mesh.simplify(16777216)` (nvdiffrast limit), then
  `o_voxel.postprocess.to_glb(vertices=, faces=, attr_volume=mesh.attrs, coords=,
  attr_layout=mesh.layout, voxel_size=mesh.voxel_size, aabb=[[-0.5]*3, [0.5]*3],
  decimation_target=, texture_size=, remesh=True, remesh_band=1, remesh_project=0, verbose=)`.

Precision comes from the checkpoints' configs (`_bf16` / `_fp16` in their names); upstream does
not cast the pipeline, so neither do we.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.backends.gpu.base import GpuBackend
from serve_app.backends.gpu.images import glb_bytes, mesh_counts, prepare_images, synthetic_object
from serve_app.backends.gpu.options import check_image_count, sampler_overrides
from serve_app.backends.gpu.paths import (
    checkpoint_files,
    hf_model_files,
    is_external_ref,
    missing_files,
    raise_if_missing,
    read_pipeline_config,
    split_external_ref,
    staged_model_dir,
)
from serve_app.backends.gpu.torch_helpers import Stopwatch, report_progress
from serve_app.errors import BackendUnavailable
from serve_app.settings import Settings

log = logging.getLogger(__name__)

ToGlb = Callable[..., Any]

# Trellis2ImageTo3DPipeline.model_names_to_load: from_pretrained skips any other args.models key.
MODEL_NAMES_TO_LOAD = (
    "sparse_structure_flow_model",
    "sparse_structure_decoder",
    "shape_slat_flow_model_512",
    "shape_slat_flow_model_1024",
    "shape_slat_decoder",
    "tex_slat_flow_model_512",
    "tex_slat_flow_model_1024",
    "tex_slat_decoder",
)

# Resolution option -> pipeline_type, as upstream's app.py maps its Resolution radio. 1024 means
# the cascade (shape sampled at 512, then refined at 1024), which is also pipeline.json's
# default_pipeline_type; the direct '1024' type samples the 64^3 sparse structure and costs
# more memory for no documented quality gain, so it is not exposed.
PIPELINE_TYPES: dict[int, str] = {512: "512", 1024: "1024_cascade", 1536: "1536_cascade"}

# README example: "mesh.simplify(16777216) # nvdiffrast limit" before rendering / export.
NVDIFFRAST_FACE_LIMIT = 16_777_216

AABB = [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]

# Checkpoints TRELLIS.2-4B borrows from other repos: repo id -> LocalPaths attribute of its dir.
_EXTERNAL_REPO_DIRS = {"microsoft/TRELLIS-image-large": "trellis_dir"}


def pipeline_type_for(resolution: int | None) -> str | None:
    """pipeline_type for a task's resolution; None keeps the checkpoint's default."""
    if resolution is None:
        return None
    return PIPELINE_TYPES[resolution]


@dataclass(frozen=True)
class Trellis2Weights:
    """A pipeline.json rewritten to local paths, plus the files to link next to it."""

    model_dir: Path
    config: dict[str, Any]
    links: dict[str, Path]


class Trellis2Backend(GpuBackend):
    """TRELLIS.2-4B: one image, 512 / 1024 / 1536 resolution, PBR GLB."""

    name = "trellis2"
    label = "TRELLIS.2"
    oom_hint = "try resolution 512, or a GPU with more memory (24 GB or more)"

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: Any | None = None,
        to_glb: ToGlb | None = None,
        torch: Any | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(settings, pipeline=pipeline, torch=torch, clock=clock)
        self._to_glb = to_glb

    # -- weights ------------------------------------------------------------------------------
    def check_weights(self) -> Trellis2Weights:
        """Every checkpoint, the DINOv3 encoder and the background remover, or BackendUnavailable
        naming what is missing. Returns pipeline.json rewritten so nothing resolves to the hub."""
        model_dir = self.paths.trellis2_dir
        config = copy.deepcopy(read_pipeline_config(model_dir, self.label))
        args = config["args"]
        missing: list[Path] = []
        links: dict[str, Path] = {}
        for key, ref in list(args["models"].items()):
            if key not in MODEL_NAMES_TO_LOAD:
                continue
            ref = str(ref)
            if not is_external_ref(ref):
                missing += missing_files(model_dir, checkpoint_files(ref))
                continue
            repo_id, inner = split_external_ref(ref)
            source = self._external_source(model_dir, repo_id, inner)
            absent = missing_files(source, checkpoint_files(inner))
            missing += absent
            if source != model_dir and not absent:
                for rel in checkpoint_files(inner):
                    links[rel] = source / rel
            # Local relative ref: upstream then loads f"{path}/{inner}" from the staged dir.
            args["models"][key] = inner

        cond = args.get("image_cond_model")
        if not (isinstance(cond, dict) and cond.get("name") == "DinoV3FeatureExtractor"):
            raise BackendUnavailable(
                f"{self.label}: unsupported image_cond_model {cond!r} in pipeline.json "
                "(expected DinoV3FeatureExtractor)",
                code="weights_invalid",
            )
        missing += hf_model_files(self.paths.dinov3_dir)[1]
        cond.setdefault("args", {})["model_name"] = str(self.paths.dinov3_dir)

        rembg = args.get("rembg_model")
        if not (isinstance(rembg, dict) and rembg.get("name") == "BiRefNet"):
            raise BackendUnavailable(
                f"{self.label}: unsupported rembg_model {rembg!r} in pipeline.json "
                "(expected BiRefNet)",
                code="weights_invalid",
            )
        missing += hf_model_files(self.paths.rembg_dir)[1]
        # Upstream names briaai/RMBG-2.0 (CC BY-NC 4.0); we load whatever BiRefNet-architecture
        # checkpoint the operator put at trellis2_rembg_dir (default: MIT ZhengPeng7/BiRefNet).
        rembg.setdefault("args", {})["model_name"] = str(self.paths.rembg_dir)

        # low_vram (upstream default True) moves each model to the GPU only while it runs:
        # slower, but fits 24 GB cards. A dedicated big GPU can turn it off.
        args["low_vram"] = self.settings.trellis2_low_vram
        raise_if_missing(self.label, missing)
        return Trellis2Weights(model_dir, config, links)

    def _external_source(self, model_dir: Path, repo_id: str, inner: str) -> Path:
        """Where a borrowed checkpoint lives: copied into the model dir, or its own repo's dir."""
        if not missing_files(model_dir, checkpoint_files(inner)):
            return model_dir
        attr = _EXTERNAL_REPO_DIRS.get(repo_id)
        if attr is not None:
            return Path(getattr(self.paths, attr))
        return self.paths.weights_dir / repo_id.split("/", 1)[1]

    # -- loading ------------------------------------------------------------------------------
    def _load_pipeline(self, torch: Any, plan: Trellis2Weights) -> Any:
        import o_voxel
        from trellis2.pipelines import Trellis2ImageTo3DPipeline

        # Everything from_pretrained reads is loaded into memory before it returns
        # (safetensors load_file, transformers from_pretrained), so the staged dir can go after.
        with staged_model_dir(plan.model_dir, plan.config, plan.links) as stage:
            pipeline = Trellis2ImageTo3DPipeline.from_pretrained(str(stage))
        pipeline.cuda()
        if self._to_glb is None:
            self._to_glb = o_voxel.postprocess.to_glb
        return pipeline

    def _warm_up(self, pipeline: Any) -> None:
        # The cheapest pipeline type with pipeline.json's sampler defaults: DINOv3, the flow
        # models' kernels and the decoders. o_voxel export (where upstream hangs are reported)
        # is left to the first task, which has a timeout.
        image = pipeline.preprocess_image(synthetic_object())
        pipeline.run(image, seed=0, preprocess_image=False, pipeline_type="512")

    # -- generation ------------------------------------------------------------------------------
    def _validate(self, images: Sequence[Image.Image], options: GenerationOptions) -> None:
        # Trellis2ImageTo3DPipeline.run takes a single image; there is no run_multi_image.
        check_image_count(images, self.settings, multi=False, backend=self.name)

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
            (image,) = prepare_images(
                images[:1], options.remove_background, pipeline.preprocess_image
            )

        pipeline_type = pipeline_type_for(options.resolution)
        report_progress(progress, 0.1, "sampling")
        with watch.stage("sampling"):
            meshes, latents = pipeline.run(
                image,
                seed=options.seed,
                # `guidance` drives the structure and shape stages (both 7.5 in app.py); the
                # material stage keeps its own default (1.0 upstream), whose scale differs.
                sparse_structure_sampler_params=sampler_overrides(options, "guidance_strength"),
                shape_slat_sampler_params=sampler_overrides(options, "guidance_strength"),
                tex_slat_sampler_params=sampler_overrides(
                    options, "guidance_strength", with_guidance=False
                ),
                preprocess_image=False,
                pipeline_type=pipeline_type,
                return_latent=True,
            )
        grid_resolution = latents[2]
        del latents
        mesh = meshes[0]
        mesh.simplify(NVDIFFRAST_FACE_LIMIT)

        report_progress(progress, 0.6, "baking PBR textures")
        to_glb = self._to_glb
        if to_glb is None:
            raise BackendUnavailable(
                f"{self.label}: no GLB exporter loaded", code="backend_not_loaded"
            )
        with watch.stage("export"):
            glb_mesh = to_glb(
                vertices=mesh.vertices,
                faces=mesh.faces,
                attr_volume=mesh.attrs,
                coords=mesh.coords,
                attr_layout=mesh.layout,
                voxel_size=mesh.voxel_size,
                aabb=AABB,
                decimation_target=options.face_limit,
                texture_size=options.texture_size,
                remesh=True,
                remesh_band=1,
                remesh_project=0,
                verbose=False,
            )
            glb = glb_bytes(glb_mesh)

        stats: dict[str, float | int | str] = {
            "backend": self.name,
            "seed": options.seed,
            "pipeline_type": pipeline_type or str(getattr(pipeline, "default_pipeline_type", "")),
            "grid_resolution": int(grid_resolution),
            "texture_size": options.texture_size,
            "decimation_target": options.face_limit,
            **mesh_counts(glb_mesh),
        }
        return GeneratedAsset(glb=glb, stats=stats)
