"""Plumbing shared by the TRELLIS and TRELLIS.2 backends: option checks, weight-directory checks,
offline setup, input preparation and torch memory helpers.

Nothing here imports torch or the TRELLIS packages; callers pass the modules in, so the logic runs
(and is tested) on machines without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serve_app import weights
from serve_app.backends.base import GeneratedAsset, GenerationOptions, ProgressCallback
from serve_app.errors import (
    BackendUnavailable,
    GenerationFailed,
    InvalidInput,
    NoObjectFound,
    Photo3DError,
)
from serve_app.settings import Settings

log = logging.getLogger(__name__)

# Serving reads weights from disk only (DESIGN.md): these make huggingface_hub / transformers fail
# fast instead of reaching for the network if anything still asks for a hub id.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

# upstream preprocess_image keeps pixels whose alpha exceeds 0.8 * 255 when it crops
# (trellis/pipelines/trellis_image_to_3d.py, trellis2/pipelines/trellis2_image_to_3d.py).
_ALPHA_KEEP = 0.8 * 255


# --- local paths ------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPaths:
    """Where the backends find the models their pipelines load besides their own checkpoints."""

    weights_dir: Path
    trellis_dir: Path
    trellis2_dir: Path
    torch_home: Path
    u2net_home: Path
    dinov3_dir: Path
    rembg_dir: Path


def local_paths(settings: Settings) -> LocalPaths:
    """Resolve every local weight location from settings (explicit dirs win over the layout)."""
    # Absolute, so paths handed to upstream loaders do not depend on a later working directory.
    root = Path(settings.weights_dir).absolute()

    def opt(value: Path | None, default: Path) -> Path:
        return Path(value).absolute() if value else default

    return LocalPaths(
        weights_dir=root,
        trellis_dir=Path(settings.trellis_model_dir or root / weights.TRELLIS_DIRNAME).absolute(),
        trellis2_dir=Path(
            settings.trellis2_model_dir or root / weights.TRELLIS2_DIRNAME
        ).absolute(),
        torch_home=opt(settings.torch_home, root / weights.TORCH_HOME_DIRNAME),
        u2net_home=opt(settings.u2net_home, root / weights.U2NET_DIRNAME),
        dinov3_dir=opt(settings.dinov3_model_dir, root / weights.DINOV3_DIRNAME),
        rembg_dir=opt(settings.trellis2_rembg_dir, root / weights.BIREFNET_DIRNAME),
    )


def configure_offline(
    paths: LocalPaths, env: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Point every loader at local files and switch the hub clients offline; returns what was set.

    Must run before torch / transformers / huggingface_hub are imported: they read these
    variables at import time."""
    env = os.environ if env is None else env
    applied = dict(OFFLINE_ENV)
    # torch.hub keeps repos and checkpoints under $TORCH_HOME/hub; rembg finds u2net.onnx in
    # $U2NET_HOME (rembg/sessions/base.py u2net_home) and skips its download when the file is there.
    applied["TORCH_HOME"] = str(paths.torch_home)
    applied["U2NET_HOME"] = str(paths.u2net_home)
    env.update(applied)
    # TRELLIS.2's example.py sets this to cut fragmentation; an operator's own value wins.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        # Already imported in this process: the env var alone would come too late.
        hub_constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    return applied


# --- weight-directory checks ---------------------------------------------------------------


def checkpoint_files(ref: str) -> list[str]:
    """The two files a TRELLIS checkpoint reference names (models/__init__.py from_pretrained)."""
    return [f"{ref}.json", f"{ref}.safetensors"]


def missing_files(root: Path, relpaths: Sequence[str]) -> list[Path]:
    """Paths under `root` that are absent or empty (a truncated copy counts as missing)."""
    out = []
    for rel in relpaths:
        path = root / rel
        if not path.is_file() or path.stat().st_size == 0:
            out.append(path)
    return out


def read_pipeline_config(model_dir: Path, label: str) -> dict[str, Any]:
    """pipeline.json of a TRELLIS model directory, or BackendUnavailable saying what is wrong."""
    config_path = model_dir / "pipeline.json"
    if not model_dir.is_dir():
        raise BackendUnavailable(
            f"{label} weights directory {model_dir} does not exist; fetch the weights "
            f"(photo3d weights fetch) and mount them, or set the model dir setting",
            code="weights_missing",
        )
    if not config_path.is_file():
        raise BackendUnavailable(
            f"{label} weights are incomplete: missing {config_path}", code="weights_missing"
        )
    try:
        config = json.loads(config_path.read_text())
        args = config["args"]
        if not isinstance(args.get("models"), dict):
            raise TypeError("args.models is not an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendUnavailable(
            f"{label}: {config_path} is not a TRELLIS pipeline config ({exc})",
            code="weights_invalid",
        ) from exc
    return dict(config)


def raise_if_missing(label: str, missing: Sequence[Path]) -> None:
    """One BackendUnavailable naming every missing file, so an operator fixes them in one go."""
    if missing:
        names = ", ".join(str(p) for p in dict.fromkeys(missing))
        raise BackendUnavailable(
            f"{label} weights are incomplete; missing or empty: {names}", code="weights_missing"
        )


def is_external_ref(ref: str) -> bool:
    """TRELLIS.2's rule for a checkpoint that lives in another HF repo (pipelines/base.py:
    `is_external_model = v.count('/') >= 2`), e.g. "microsoft/TRELLIS-image-large/ckpts/x"."""
    return ref.count("/") >= 2


def split_external_ref(ref: str) -> tuple[str, str]:
    """("owner/repo", "path/inside/repo") of an external checkpoint reference."""
    owner, repo, rest = ref.split("/", 2)
    return f"{owner}/{repo}", rest


def hf_model_files(model_dir: Path) -> tuple[list[str], list[Path]]:
    """Files a transformers `from_pretrained(<dir>)` needs: config.json, the weights, and the
    modules named by `auto_map` (trust_remote_code models such as BiRefNet). Returns (present
    relpaths, missing paths)."""
    missing: list[Path] = []
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return [], [config_path]
    needed = ["config.json"]
    weights_names = ("model.safetensors", "pytorch_model.bin")
    present_weights = [n for n in weights_names if (model_dir / n).is_file()]
    if not present_weights:
        missing.append(model_dir / weights_names[0])
    else:
        needed.append(present_weights[0])
    try:
        auto_map = json.loads(config_path.read_text()).get("auto_map", {}) or {}
    except (OSError, ValueError, AttributeError):
        auto_map = {}
    for target in auto_map.values() if isinstance(auto_map, dict) else ():
        # "module.Class" or "repo--module.Class"; the module file sits next to config.json.
        if isinstance(target, str) and "." in target:
            module = target.split("--")[-1].rsplit(".", 1)[0]
            needed.append(f"{module}.py")
    missing.extend(missing_files(model_dir, needed))
    return needed, missing


# --- loading from local directories -------------------------------------------------------


@contextmanager
def redirect_torch_hub(hub: Any, local_repos: Mapping[str, Path]) -> Iterator[None]:
    """While active, `hub.load('<owner>/<repo>', name, ...)` for a repo in `local_repos` loads from
    that local checkout (source='local'): no GitHub lookup, which torch.hub otherwise attempts to
    find a default branch even when the repo is cached."""
    original = hub.load

    def load(repo_or_dir: str, model: str, *args: Any, **kwargs: Any) -> Any:
        local = local_repos.get(repo_or_dir)
        if local is None:
            return original(repo_or_dir, model, *args, **kwargs)
        for key in ("source", "trust_repo", "force_reload", "skip_validation"):
            kwargs.pop(key, None)
        return original(str(local), model, *args, source="local", **kwargs)

    hub.load = load
    try:
        yield
    finally:
        hub.load = original


@contextmanager
def staged_model_dir(
    model_dir: Path, config: Mapping[str, Any], links: Mapping[str, Path]
) -> Iterator[Path]:
    """A temporary directory that mirrors `model_dir` (by symlinks) with `config` as its
    pipeline.json and extra files linked at `links` (relpath -> real file).

    Lets TRELLIS.2's `from_pretrained(<dir>)` load a rewritten config (local paths instead of hub
    ids) without writing into the weights directory, which is usually mounted read-only."""
    stage = Path(tempfile.mkdtemp(prefix="photo3d-stage-"))
    try:
        for src in model_dir.rglob("*"):
            rel = src.relative_to(model_dir)
            if src.is_dir() or rel.as_posix() == "pipeline.json" or rel.parts[0].startswith("."):
                continue
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())
        for rel_str, src in links.items():
            dst = stage / rel_str
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(Path(src).resolve())
        (stage / "pipeline.json").write_text(json.dumps(config, indent=2))
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --- options -----------------------------------------------------------------------------


def check_image_count(
    images: Sequence[Image.Image], settings: Settings, *, multi: bool, backend: str
) -> None:
    """Refuse empty input, too many photos, or several photos where the backend takes one."""
    if not images:
        raise InvalidInput("at least one image is required", code="no_images")
    if len(images) > settings.max_images_per_task:
        raise InvalidInput(
            f"{len(images)} images given; at most {settings.max_images_per_task} per task",
            code="too_many_images",
        )
    if not multi and len(images) > 1:
        raise InvalidInput(
            f"backend {backend!r} takes one image per task ({len(images)} given); use backend "
            "'trellis' for multi-view input",
            code="multi_image_unsupported",
        )


def sampler_overrides(
    options: GenerationOptions, guidance_key: str, *, with_guidance: bool = True
) -> dict[str, Any]:
    """Sampler params a task overrides; unset options keep the checkpoint's pipeline.json values
    (upstream merges them as {**self.<stage>_sampler_params, **sampler_params})."""
    params: dict[str, Any] = {}
    if options.steps is not None:
        params["steps"] = options.steps
    if with_guidance and options.guidance is not None:
        params[guidance_key] = options.guidance
    return params


def effective_simplify(simplify: float, face_limit: int, raw_faces: int) -> float:
    """TRELLIS v1's to_glb removes a *ratio* of faces; raise that ratio when needed so the result
    lands near `face_limit` (hole filling afterwards may add a few faces back)."""
    if raw_faces <= 0:
        return simplify
    needed = 1.0 - face_limit / raw_faces
    return float(min(0.99, max(simplify, needed, 0.0)))


# --- images ------------------------------------------------------------------------------


def normalize_mode(image: Image.Image) -> Image.Image:
    """RGBA when the photo carries transparency, RGB otherwise (upstream only looks at 'RGBA')."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return image.convert("RGB")


def has_alpha(image: Image.Image) -> bool:
    """Upstream's test: RGBA with at least one pixel not fully opaque."""
    if image.mode != "RGBA":
        return False
    alpha = np.asarray(image.getchannel("A"))
    return bool((alpha < 255).any())


def flatten_on_white(image: Image.Image) -> Image.Image:
    """Drop the alpha channel over white, so the segmenter sees the photo's real background."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas


def premultiplied_rgb(image: Image.Image) -> Image.Image:
    """RGB with alpha premultiplied on black: the form upstream preprocess_image hands the model."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    arr = np.asarray(image).astype(np.float32) / 255.0
    rgb = arr[:, :, :3] * arr[:, :, 3:4]
    return Image.fromarray((rgb * 255).astype(np.uint8))


def prepare_images(
    images: Sequence[Image.Image],
    remove_background: bool | None,
    preprocess: Callable[[Image.Image], Image.Image],
) -> list[Image.Image]:
    """Turn uploaded photos into what the pipeline's `run(..., preprocess_image=False)` expects.

    remove_background: None = upstream's auto rule (use the alpha channel when there is one, else
    segment); True = always segment (alpha is flattened over white first); False = the photo is
    already framed, pass it through (alpha premultiplied)."""
    out = []
    for index, raw in enumerate(images):
        image = normalize_mode(raw)
        if remove_background is False:
            out.append(premultiplied_rgb(image))
            continue
        if remove_background is True:
            image = flatten_on_white(image)
        elif has_alpha(image) and not (np.asarray(image.getchannel("A")) > _ALPHA_KEEP).any():
            raise NoObjectFound(
                f"image {index + 1}: its alpha channel is (almost) fully transparent; "
                "there is no object to reconstruct"
            )
        try:
            out.append(preprocess(image))
        except ValueError as exc:
            # Upstream crops to the mask's bounding box with np.min/np.max, which raise
            # ValueError on an empty mask: the segmenter found no foreground.
            raise NoObjectFound(
                f"image {index + 1}: no object could be separated from the background ({exc})"
            ) from exc
    return out


def synthetic_object(size: int = 256) -> Image.Image:
    """A shaded ball on a transparent background, for warm-up runs (no file, no segmenter)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r = size * 0.35
    d = np.sqrt((xx - c) ** 2 + (yy - c) ** 2) / r
    inside = d <= 1.0
    shade = np.clip(1.0 - 0.6 * d, 0.0, 1.0)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = (200 * shade).astype(np.uint8)
    rgba[..., 1] = (120 * shade).astype(np.uint8)
    rgba[..., 2] = (60 * shade).astype(np.uint8)
    rgba[..., 3] = np.where(inside, 255, 0).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def glb_bytes(mesh: Any) -> bytes:
    """Serialize a trimesh Trimesh/Scene as binary glTF.

    PNG textures, not upstream's `extension_webp=True`: EXT_texture_webp is not read by every
    viewer nor by the OBJ/USDZ converters downstream."""
    data = mesh.export(file_type="glb")
    if not isinstance(data, bytes) or not data.startswith(b"glTF"):
        raise GenerationFailed("the exported GLB is not a binary glTF file", code="export_failed")
    return bytes(data)


def mesh_counts(mesh: Any) -> dict[str, int]:
    """Vertex / face counts of the exported trimesh, for task stats."""
    out: dict[str, int] = {}
    for key in ("vertices", "faces"):
        value = getattr(mesh, key, None)
        if value is not None:
            out[key] = len(value)
    return out


# --- torch ---------------------------------------------------------------------------------


def import_torch() -> Any:
    """torch, or BackendUnavailable when this install has no GPU stack."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            "torch is not installed here; the TRELLIS backends run in the GPU image "
            "(cluster/docker/Dockerfile.gpu)",
            code="gpu_stack_missing",
        ) from exc
    return torch


def require_cuda(torch: Any, label: str) -> None:
    """BackendUnavailable unless a CUDA device is usable."""
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"{label} needs an NVIDIA GPU with CUDA; torch sees none "
            f"(torch {getattr(torch, '__version__', '?')}, CUDA build {torch.version.cuda})",
            code="cuda_unavailable",
        )


def cuda_probe(torch: Any) -> None:
    """A tiny op on the device; raises BackendUnavailable when CUDA is broken (e.g. after an
    illegal memory access, which poisons the context for the rest of the process)."""
    try:
        x = torch.arange(8, device="cuda", dtype=torch.float32)
        value = float((x * 2).sum().item())
        torch.cuda.synchronize()
    except Exception as exc:  # any CUDA runtime error means this replica must go
        raise BackendUnavailable(
            f"CUDA is not usable: {type(exc).__name__}: {exc}", code="cuda_broken"
        ) from exc
    if value != 56.0:
        raise BackendUnavailable(
            f"CUDA returned a wrong result ({value} != 56.0)", code="cuda_broken"
        )


def reset_peak_memory(torch: Any | None) -> None:
    """Start a fresh peak-memory window for this task."""
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(torch: Any | None) -> int | None:
    """Peak bytes allocated on the device since the last reset."""
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return None


def release_memory(torch: Any | None) -> None:
    """Give cached blocks back after a task so the next one (or another process) can use them."""
    import gc

    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(torch: Any | None, exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError (and its older RuntimeError spelling)."""
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def out_of_memory(label: str, hint: str) -> GenerationFailed:
    """The error a task gets when the GPU ran out of memory."""
    return GenerationFailed(f"{label} ran out of GPU memory; {hint}", code="gpu_out_of_memory")


class Stopwatch:
    """Named durations for task stats."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block under `name`."""
        start = self._clock()
        try:
            yield
        finally:
            self.seconds[name] = round(self._clock() - start, 3)


def report_progress(progress: ProgressCallback, fraction: float, stage: str) -> None:
    """Call the task's progress callback; a failing callback must not fail the generation."""
    try:
        progress(fraction, stage)
    except Exception:  # the callback belongs to the worker; its bugs are logged, not raised
        log.exception("progress callback failed at %s", stage)


# --- the shared backend skeleton -------------------------------------------------------------


class GpuBackend:
    """Load / generate / health flow shared by the TRELLIS backends.

    Subclasses supply the model-specific parts: `check_weights`, `_load_pipeline`, `_warm_up`,
    `_validate` and `_generate`. A pipeline passed to the constructor (a test fake) makes `load`
    skip weights, CUDA and imports, so the same generate code runs on a CPU-only machine."""

    name = "gpu"
    label = "GPU backend"
    oom_hint = "try a smaller input or a GPU with more memory"

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: Any | None = None,
        torch: Any | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = local_paths(settings)
        self._pipeline = pipeline
        self._torch = torch
        self._clock = clock or time.perf_counter
        self.load_seconds: float | None = None

    # -- to implement ----------------------------------------------------------------------
    def check_weights(self) -> Any:
        """Raise BackendUnavailable naming every missing file; return what loading needs."""
        raise NotImplementedError

    def _load_pipeline(self, torch: Any, plan: Any) -> Any:
        raise NotImplementedError

    def _warm_up(self, pipeline: Any) -> None:
        raise NotImplementedError

    def _validate(self, images: Sequence[Image.Image], options: GenerationOptions) -> None:
        raise NotImplementedError

    def _generate(
        self,
        pipeline: Any,
        images: Sequence[Image.Image],
        options: GenerationOptions,
        progress: ProgressCallback,
        watch: Stopwatch,
    ) -> GeneratedAsset:
        raise NotImplementedError

    # -- Backend protocol ------------------------------------------------------------------------
    def load(self) -> None:
        """Check weights, go offline, load the pipeline onto the GPU and warm it up."""
        if self._pipeline is not None:
            return
        start = self._clock()
        plan = self.check_weights()
        configure_offline(self.paths)
        torch = import_torch()
        require_cuda(torch, self.label)
        try:
            pipeline = self._load_pipeline(torch, plan)
        except Photo3DError:
            raise
        except ImportError as exc:
            raise BackendUnavailable(
                f"{self.label}: a GPU library is missing ({exc}); use the GPU image "
                "(cluster/docker/Dockerfile.gpu)",
                code="gpu_stack_missing",
            ) from exc
        except Exception as exc:  # a replica that cannot load must say why and stay out of service
            raise BackendUnavailable(
                f"{self.label} failed to load: {type(exc).__name__}: {exc}", code="load_failed"
            ) from exc
        self._torch = torch
        if self.settings.gpu_warmup:
            try:
                self._warm_up(pipeline)
            except Exception as exc:  # warm-up touches every CUDA extension: failing is fatal
                raise BackendUnavailable(
                    f"{self.label} warm-up failed: {type(exc).__name__}: {exc}",
                    code="warmup_failed",
                ) from exc
            finally:
                release_memory(torch)
        self._pipeline = pipeline
        self.load_seconds = round(self._clock() - start, 3)
        log.info("%s loaded in %.1f s", self.label, self.load_seconds)

    def generate(
        self, images: list[Image.Image], options: GenerationOptions, progress: ProgressCallback
    ) -> GeneratedAsset:
        """Validate, run the pipeline, export; GPU memory is released whatever happens."""
        pipeline = self._require_loaded()
        self._validate(images, options)
        torch = self._torch
        watch = Stopwatch(self._clock)
        reset_peak_memory(torch)
        try:
            asset = self._generate(pipeline, images, options, progress, watch)
        except Photo3DError:
            raise
        except Exception as exc:
            if is_out_of_memory(torch, exc):
                # The traceback's frames hold the task's GPU tensors; drop them so the
                # empty_cache below really frees the memory for the next task.
                traceback.clear_frames(exc.__traceback__)
                raise out_of_memory(self.label, self.oom_hint) from exc
            raise
        finally:
            release_memory(torch)
        for stage, seconds in watch.seconds.items():
            asset.stats[f"seconds_{stage}"] = seconds
        peak = peak_memory_bytes(torch)
        if peak is not None:
            asset.stats["peak_gpu_memory_bytes"] = peak
        report_progress(progress, 1.0, "done")
        return asset

    def check_health(self) -> None:
        """Raise when the pipeline is not loaded or CUDA no longer works."""
        self._require_loaded()
        if self._torch is not None:
            cuda_probe(self._torch)

    def _require_loaded(self) -> Any:
        if self._pipeline is None:
            raise BackendUnavailable(
                f"{self.label} is not loaded (call load() first)", code="backend_not_loaded"
            )
        return self._pipeline
