"""TRELLIS / TRELLIS.2 backends without a GPU: option mapping and validation, weight-directory
checks, export of upstream-shaped outputs (through clearly fake pipelines), and weights.py."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import trimesh
from PIL import Image

from serve_app.backends.base import GenerationOptions
from serve_app.backends.gpu import weights
from serve_app.backends.gpu.images import prepare_images, synthetic_object
from serve_app.backends.gpu.options import effective_simplify
from serve_app.backends.gpu.paths import redirect_torch_hub, staged_model_dir
from serve_app.backends.trellis import TrellisBackend, dinov2_checkpoint_name
from serve_app.backends.trellis2 import Trellis2Backend, pipeline_type_for
from serve_app.errors import BackendUnavailable, GenerationFailed, InvalidInput, NoObjectFound
from serve_app.settings import Settings

# --- fakes ----------------------------------------------------------------------------------------


class FakeGaussian:
    """Stands in for trellis.representations.Gaussian: only save_ply(path) is used."""

    def save_ply(self, path: str) -> None:
        header = b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nend_header\n"
        Path(path).write_bytes(header)


class FakeMeshExtractResult:
    """Stands in for trellis MeshExtractResult: vertices/faces tensors (numpy here)."""

    def __init__(self, faces: int = 40_000) -> None:
        self.vertices = np.zeros((faces // 2, 3), dtype=np.float32)
        self.faces = np.zeros((faces, 3), dtype=np.int64)


class FakeTrellisPipeline:
    """A FAKE TrellisImageTo3DPipeline: records calls, returns upstream-shaped outputs
    ({"gaussian": [...], "mesh": [...]}) without any model."""

    def __init__(self, faces: int = 40_000) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.preprocessed: list[Image.Image] = []
        self.faces = faces

    def preprocess_image(self, image: Image.Image) -> Image.Image:
        self.preprocessed.append(image)
        if image.mode != "RGBA":
            return Image.new("RGB", (518, 518))  # pretend the segmenter found an object
        alpha = np.asarray(image.getchannel("A"))
        if not (alpha > 0.8 * 255).any():
            np.min(np.zeros((0,)))  # what upstream's bbox crop does on an empty mask: ValueError
        return Image.new("RGB", (518, 518))

    def _outputs(self) -> dict[str, list[Any]]:
        return {"gaussian": [FakeGaussian()], "mesh": [FakeMeshExtractResult(self.faces)]}

    def run(self, image: Image.Image, **kwargs: Any) -> dict[str, list[Any]]:
        self.calls.append(("run", image, kwargs))
        return self._outputs()

    def run_multi_image(self, images: list[Image.Image], **kwargs: Any) -> dict[str, list[Any]]:
        self.calls.append(("run_multi_image", images, kwargs))
        return self._outputs()


class FakeMeshWithVoxel:
    """Stands in for trellis2 MeshWithVoxel (the attributes the GLB export reads)."""

    def __init__(self) -> None:
        self.vertices = np.zeros((4, 3), dtype=np.float32)
        self.faces = np.zeros((2, 3), dtype=np.int64)
        self.attrs = np.zeros((8, 6), dtype=np.float32)
        self.coords = np.zeros((8, 3), dtype=np.int64)
        self.layout = {
            "base_color": slice(0, 3),
            "metallic": slice(3, 4),
            "roughness": slice(4, 5),
            "alpha": slice(5, 6),
        }
        self.voxel_size = 1 / 1024
        self.simplified_to: int | None = None

    def simplify(self, target: int) -> None:
        self.simplified_to = target


class FakeTrellis2Pipeline:
    """A FAKE Trellis2ImageTo3DPipeline: returns ([MeshWithVoxel], (shape_slat, tex_slat, res))
    as upstream's run(..., return_latent=True) does."""

    default_pipeline_type = "1024_cascade"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.mesh = FakeMeshWithVoxel()

    def preprocess_image(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    def run(self, image: Image.Image, **kwargs: Any) -> tuple[list[Any], tuple[Any, Any, int]]:
        self.calls.append(kwargs)
        res = {"512": 512, "1536_cascade": 1536}.get(kwargs.get("pipeline_type") or "", 1024)
        return [self.mesh], (None, None, res)


class FakeToGlb:
    """A fake exporter returning a real trimesh mesh, recording its arguments."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> trimesh.Trimesh:
        self.args, self.kwargs = args, kwargs
        return cast(trimesh.Trimesh, trimesh.creation.box(extents=(1.0, 1.0, 1.0)))


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(weights_dir=tmp_path / "weights", **kw)


def _photo(mode: str = "RGB") -> Image.Image:
    if mode == "RGBA":
        return synthetic_object(64)
    return Image.new("RGB", (64, 64), (90, 120, 200))


def _progress_log() -> tuple[list[tuple[float, str]], Any]:
    seen: list[tuple[float, str]] = []
    return seen, lambda fraction, stage: seen.append((fraction, stage))


# --- TRELLIS v1: generation through a fake pipeline -----------------------------------------------


def test_trellis_single_image_maps_options_and_exports_glb(tmp_path: Path) -> None:
    pipe, to_glb = FakeTrellisPipeline(faces=40_000), FakeToGlb()
    backend = TrellisBackend(
        _settings(tmp_path),
        pipeline=pipe,
        to_glb=to_glb,
        render_preview=lambda g: np.zeros((8, 8, 3), np.uint8),
    )
    backend.load()  # injected pipeline: no weights, no CUDA
    seen, progress = _progress_log()
    options = GenerationOptions(
        seed=7, steps=12, guidance=3.5, texture_size=2048, simplify=0.9, face_limit=20_000
    )

    asset = backend.generate([_photo("RGBA")], options, progress)

    kind, _, kwargs = pipe.calls[0]
    assert kind == "run"
    assert kwargs["seed"] == 7
    assert kwargs["sparse_structure_sampler_params"] == {"steps": 12, "cfg_strength": 3.5}
    assert kwargs["slat_sampler_params"] == {"steps": 12, "cfg_strength": 3.5}
    assert kwargs["preprocess_image"] is False
    assert kwargs["formats"] == ["gaussian", "mesh"]
    assert isinstance(to_glb.args[0], FakeGaussian)
    assert isinstance(to_glb.args[1], FakeMeshExtractResult)
    assert to_glb.kwargs["texture_size"] == 2048
    assert to_glb.kwargs["simplify"] == pytest.approx(0.9)  # 40k faces -> 4k already <= 20k
    assert asset.glb.startswith(b"glTF")
    loaded = cast(
        trimesh.Trimesh, trimesh.load(io.BytesIO(asset.glb), file_type="glb", force="mesh")
    )
    assert len(loaded.faces) == 12
    assert asset.extra_files["gaussians.ply"].startswith(b"ply")
    assert asset.preview_png is not None and asset.preview_png.startswith(b"\x89PNG")
    assert asset.stats["backend"] == "trellis" and asset.stats["faces"] == 12
    assert "seconds_sampling" in asset.stats
    assert seen[-1] == (1.0, "done")


def test_trellis_unset_options_keep_pipeline_defaults(tmp_path: Path) -> None:
    pipe = FakeTrellisPipeline()
    backend = TrellisBackend(_settings(tmp_path), pipeline=pipe, to_glb=FakeToGlb())
    backend.generate([_photo("RGBA")], GenerationOptions(), lambda f, s: None)
    _, _, kwargs = pipe.calls[0]
    assert kwargs["sparse_structure_sampler_params"] == {}
    assert kwargs["slat_sampler_params"] == {}
    assert kwargs["seed"] == 0


def test_trellis_face_limit_raises_simplify_ratio(tmp_path: Path) -> None:
    pipe, to_glb = FakeTrellisPipeline(faces=1_000_000), FakeToGlb()
    backend = TrellisBackend(_settings(tmp_path), pipeline=pipe, to_glb=to_glb)
    backend.generate(
        [_photo("RGBA")], GenerationOptions(simplify=0.5, face_limit=20_000), lambda f, s: None
    )
    assert to_glb.kwargs["simplify"] == pytest.approx(0.98)
    assert effective_simplify(0.95, 500_000, 0) == 0.95
    assert effective_simplify(0.0, 1000, 1_000_000) == 0.99  # upstream ratio stays < 1


@pytest.mark.parametrize("mode", ["stochastic", "multidiffusion"])
def test_trellis_multi_image_uses_run_multi_image(tmp_path: Path, mode: Any) -> None:
    pipe = FakeTrellisPipeline()
    backend = TrellisBackend(_settings(tmp_path), pipeline=pipe, to_glb=FakeToGlb())
    asset = backend.generate(
        [_photo("RGBA"), _photo("RGBA"), _photo("RGB")],
        GenerationOptions(multi_image_mode=mode),
        lambda f, s: None,
    )
    kind, images, kwargs = pipe.calls[0]
    assert kind == "run_multi_image"
    assert len(images) == 3
    assert kwargs["mode"] == mode
    assert asset.stats["multi_image_mode"] == mode


def test_trellis_rejects_trellis2_only_resolution(tmp_path: Path) -> None:
    backend = TrellisBackend(
        _settings(tmp_path), pipeline=FakeTrellisPipeline(), to_glb=FakeToGlb()
    )
    with pytest.raises(InvalidInput) as err:
        backend.generate([_photo()], GenerationOptions(resolution=1024), lambda f, s: None)
    assert err.value.code == "unsupported_option"
    assert "resolution" in err.value.message


def test_image_count_limits(tmp_path: Path) -> None:
    backend = TrellisBackend(
        _settings(tmp_path, max_images_per_task=2),
        pipeline=FakeTrellisPipeline(),
        to_glb=FakeToGlb(),
    )
    with pytest.raises(InvalidInput) as err:
        backend.generate([], GenerationOptions(), lambda f, s: None)
    assert err.value.code == "no_images"
    with pytest.raises(InvalidInput) as err:
        backend.generate([_photo()] * 3, GenerationOptions(), lambda f, s: None)
    assert err.value.code == "too_many_images"


def test_out_of_range_options_are_refused_before_the_backend() -> None:
    # GenerationOptions is the API's validation layer; the backends rely on its ranges.
    with pytest.raises(ValueError):
        GenerationOptions(steps=0)
    with pytest.raises(ValueError):
        GenerationOptions(guidance=25.0)
    with pytest.raises(ValueError):
        GenerationOptions(resolution=768)  # type: ignore[arg-type]


def test_remove_background_modes(tmp_path: Path) -> None:
    pipe = FakeTrellisPipeline()
    rgba = _photo("RGBA")
    # auto: alpha present -> upstream uses it (the RGBA image reaches preprocess_image)
    prepare_images([rgba], None, pipe.preprocess_image)
    assert pipe.preprocessed[-1].mode == "RGBA"
    # forced: alpha flattened so the segmenter runs
    prepare_images([rgba], True, pipe.preprocess_image)
    assert pipe.preprocessed[-1].mode == "RGB"
    # off: passed through, premultiplied, preprocess not called
    before = len(pipe.preprocessed)
    (out,) = prepare_images([rgba], False, pipe.preprocess_image)
    assert len(pipe.preprocessed) == before and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)  # transparent corner -> black, as upstream


def test_transparent_image_is_no_object_found(tmp_path: Path) -> None:
    backend = TrellisBackend(
        _settings(tmp_path), pipeline=FakeTrellisPipeline(), to_glb=FakeToGlb()
    )
    empty = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    with pytest.raises(NoObjectFound) as err:
        backend.generate([empty], GenerationOptions(), lambda f, s: None)
    assert err.value.code == "no_object_found"
    faint = Image.new("RGBA", (32, 32), (255, 0, 0, 100))  # nothing above upstream's 0.8 cut
    with pytest.raises(NoObjectFound):
        backend.generate([faint], GenerationOptions(), lambda f, s: None)


def test_segmenter_finding_nothing_is_no_object_found(tmp_path: Path) -> None:
    class NothingFound(FakeTrellisPipeline):
        def preprocess_image(self, image: Image.Image) -> Image.Image:
            np.min(np.zeros((0,)))  # upstream's bbox crop on an empty rembg mask
            return image

    backend = TrellisBackend(_settings(tmp_path), pipeline=NothingFound(), to_glb=FakeToGlb())
    with pytest.raises(NoObjectFound) as err:
        backend.generate([_photo("RGB")], GenerationOptions(), lambda f, s: None)
    assert "image 1" in err.value.message


def test_not_loaded_backend_is_unavailable(tmp_path: Path) -> None:
    backend = TrellisBackend(_settings(tmp_path))
    with pytest.raises(BackendUnavailable) as err:
        backend.generate([_photo()], GenerationOptions(), lambda f, s: None)
    assert err.value.code == "backend_not_loaded"
    with pytest.raises(BackendUnavailable):
        backend.check_health()
    TrellisBackend(_settings(tmp_path), pipeline=FakeTrellisPipeline()).check_health()


def test_failing_progress_callback_does_not_fail_generation(tmp_path: Path) -> None:
    backend = TrellisBackend(
        _settings(tmp_path), pipeline=FakeTrellisPipeline(), to_glb=FakeToGlb()
    )

    def broken(fraction: float, stage: str) -> None:
        raise RuntimeError("worker bug")

    assert backend.generate([_photo("RGBA")], GenerationOptions(), broken).glb


# --- TRELLIS.2: generation through a fake pipeline ------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [(512, "512"), (1024, "1024_cascade"), (1536, "1536_cascade"), (None, None)],
)
def test_trellis2_resolution_maps_to_pipeline_type(
    tmp_path: Path, resolution: Any, expected: str | None
) -> None:
    assert pipeline_type_for(resolution) == expected
    pipe, to_glb = FakeTrellis2Pipeline(), FakeToGlb()
    backend = Trellis2Backend(_settings(tmp_path), pipeline=pipe, to_glb=to_glb)
    asset = backend.generate(
        [_photo("RGBA")], GenerationOptions(resolution=resolution), lambda f, s: None
    )
    assert pipe.calls[0]["pipeline_type"] == expected
    assert asset.stats["pipeline_type"] == (expected or "1024_cascade")


def test_trellis2_maps_sampler_params_and_pbr_export(tmp_path: Path) -> None:
    pipe, to_glb = FakeTrellis2Pipeline(), FakeToGlb()
    backend = Trellis2Backend(_settings(tmp_path), pipeline=pipe, to_glb=to_glb)
    options = GenerationOptions(
        seed=3, steps=8, guidance=6.0, texture_size=4096, face_limit=100_000, resolution=1536
    )
    asset = backend.generate([_photo("RGB")], options, lambda f, s: None)

    call = pipe.calls[0]
    assert call["seed"] == 3 and call["return_latent"] is True and call["preprocess_image"] is False
    assert call["sparse_structure_sampler_params"] == {"steps": 8, "guidance_strength": 6.0}
    assert call["shape_slat_sampler_params"] == {"steps": 8, "guidance_strength": 6.0}
    assert call["tex_slat_sampler_params"] == {"steps": 8}  # material stage keeps its default
    assert pipe.mesh.simplified_to == 16_777_216
    kw = to_glb.kwargs
    assert kw["attr_volume"] is pipe.mesh.attrs and kw["attr_layout"] is pipe.mesh.layout
    assert kw["voxel_size"] == pipe.mesh.voxel_size
    assert kw["aabb"] == [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]
    assert kw["decimation_target"] == 100_000 and kw["texture_size"] == 4096
    assert kw["remesh"] is True
    assert asset.glb.startswith(b"glTF")
    assert asset.stats["grid_resolution"] == 1536
    assert asset.stats["pipeline_type"] == "1536_cascade"


def test_trellis2_refuses_multiple_images(tmp_path: Path) -> None:
    backend = Trellis2Backend(
        _settings(tmp_path), pipeline=FakeTrellis2Pipeline(), to_glb=FakeToGlb()
    )
    with pytest.raises(InvalidInput) as err:
        backend.generate([_photo(), _photo()], GenerationOptions(), lambda f, s: None)
    assert err.value.code == "multi_image_unsupported"


def test_trellis2_out_of_memory_becomes_generation_failed(tmp_path: Path) -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    fake_cuda = types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError, is_available=lambda: False)
    fake_torch = types.SimpleNamespace(cuda=fake_cuda)

    class OomPipeline(FakeTrellis2Pipeline):
        def run(self, image: Image.Image, **kwargs: Any) -> Any:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    backend = Trellis2Backend(
        _settings(tmp_path), pipeline=OomPipeline(), to_glb=FakeToGlb(), torch=fake_torch
    )
    with pytest.raises(GenerationFailed) as err:
        backend.generate([_photo()], GenerationOptions(resolution=1536), lambda f, s: None)
    assert err.value.code == "gpu_out_of_memory"
    assert "resolution 512" in err.value.message


# --- weight-directory checks ----------------------------------------------------------------------


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


TRELLIS_MODELS = {
    "sparse_structure_decoder": "ckpts/ss_dec_conv3d_16l8_fp16",
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_L_16l8_fp16",
    "slat_decoder_gs": "ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16",
    "slat_decoder_rf": "ckpts/slat_dec_rf_swin8_B_64l8r16_fp16",
    "slat_decoder_mesh": "ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16",
    "slat_flow_model": "ckpts/slat_flow_img_dit_L_64l8p2_fp16",
}


def _trellis_tree(root: Path) -> None:
    model = root / "TRELLIS-image-large"
    _write(
        model / "pipeline.json",
        json.dumps(
            {
                "name": "TrellisImageTo3DPipeline",
                "args": {"models": TRELLIS_MODELS, "image_cond_model": "dinov2_vitl14_reg"},
            }
        ).encode(),
    )
    for ref in TRELLIS_MODELS.values():
        _write(model / f"{ref}.json")
        _write(model / f"{ref}.safetensors")
    _write(root / "torch/hub/facebookresearch_dinov2_main/hubconf.py")
    _write(root / "torch/hub/facebookresearch_dinov2_main/dinov2/hub/backbones.py")
    _write(root / "torch/hub/checkpoints/dinov2_vitl14_reg4_pretrain.pth")
    _write(root / "u2net/u2net.onnx")


def test_trellis_weight_check_passes_on_complete_tree(tmp_path: Path) -> None:
    _trellis_tree(tmp_path / "weights")
    plan = TrellisBackend(_settings(tmp_path)).check_weights()
    assert plan.dinov2_checkpoint.name == "dinov2_vitl14_reg4_pretrain.pth"
    # the static manifest in weights.py agrees with this layout
    assert weights.verify("trellis", tmp_path / "weights", hashes=False).ok
    # ...and checks the one checksum upstream publishes (rembg's md5 of u2net.onnx)
    assert weights.verify("trellis", tmp_path / "weights").mismatched == ["u2net/u2net.onnx"]


def test_trellis_weight_check_names_every_missing_file(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    _trellis_tree(root)
    (root / "TRELLIS-image-large/ckpts/slat_flow_img_dit_L_64l8p2_fp16.safetensors").unlink()
    (root / "u2net/u2net.onnx").write_bytes(b"")  # truncated copy counts as missing
    (root / "torch/hub/checkpoints/dinov2_vitl14_reg4_pretrain.pth").unlink()
    with pytest.raises(BackendUnavailable) as err:
        TrellisBackend(_settings(tmp_path)).check_weights()
    msg = err.value.message
    assert err.value.code == "weights_missing"
    assert "slat_flow_img_dit_L_64l8p2_fp16.safetensors" in msg
    assert "u2net.onnx" in msg
    assert "dinov2_vitl14_reg4_pretrain.pth" in msg
    assert "ss_flow_img_dit_L_16l8_fp16" not in msg


def test_trellis_weight_check_without_directory_or_config(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as err:
        TrellisBackend(_settings(tmp_path)).check_weights()
    assert "does not exist" in err.value.message
    explicit = tmp_path / "elsewhere"
    explicit.mkdir()
    with pytest.raises(BackendUnavailable) as err:
        TrellisBackend(_settings(tmp_path, trellis_model_dir=explicit)).check_weights()
    assert str(explicit / "pipeline.json") in err.value.message


def test_load_without_torch_or_weights_is_backend_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable):
        TrellisBackend(_settings(tmp_path)).load()
    with pytest.raises(BackendUnavailable):
        Trellis2Backend(_settings(tmp_path)).load()


TRELLIS2_MODELS = {
    "sparse_structure_decoder": "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
    "sparse_structure_flow_model": "ckpts/ss_flow_img_dit_1_3B_64_bf16",
    "shape_slat_decoder": "ckpts/shape_dec_next_dc_f16c32_fp16",
    "shape_slat_flow_model_512": "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16",
    "shape_slat_flow_model_1024": "ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16",
    "tex_slat_decoder": "ckpts/tex_dec_next_dc_f16c32_fp16",
    "tex_slat_flow_model_512": "ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16",
    "tex_slat_flow_model_1024": "ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
}


def _trellis2_tree(root: Path) -> None:
    model = root / "TRELLIS.2-4B"
    _write(
        model / "pipeline.json",
        json.dumps(
            {
                "name": "Trellis2ImageTo3DPipeline",
                "args": {
                    "models": TRELLIS2_MODELS,
                    "image_cond_model": {
                        "name": "DinoV3FeatureExtractor",
                        "args": {"model_name": "facebook/dinov3-vitl16-pretrain-lvd1689m"},
                    },
                    "rembg_model": {"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
                    "default_pipeline_type": "1024_cascade",
                },
            }
        ).encode(),
    )
    for ref in TRELLIS2_MODELS.values():
        if not ref.startswith("microsoft/"):
            _write(model / f"{ref}.json")
            _write(model / f"{ref}.safetensors")
    _write(root / "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.json")
    _write(root / "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.safetensors")
    _write(root / "dinov3-vitl16-pretrain-lvd1689m/config.json", b"{}")
    _write(root / "dinov3-vitl16-pretrain-lvd1689m/model.safetensors")
    _write(
        root / "BiRefNet/config.json",
        json.dumps(
            {
                "auto_map": {
                    "AutoConfig": "BiRefNet_config.BiRefNetConfig",
                    "AutoModelForImageSegmentation": "birefnet.BiRefNet",
                }
            }
        ).encode(),
    )
    _write(root / "BiRefNet/model.safetensors")
    _write(root / "BiRefNet/birefnet.py")
    _write(root / "BiRefNet/BiRefNet_config.py")


def test_trellis2_weight_check_rewrites_config_to_local_paths(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    _trellis2_tree(root)
    plan = Trellis2Backend(_settings(tmp_path)).check_weights()
    args = plan.config["args"]
    assert args["models"]["sparse_structure_decoder"] == "ckpts/ss_dec_conv3d_16l8_fp16"
    assert plan.links["ckpts/ss_dec_conv3d_16l8_fp16.safetensors"] == (
        root / "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.safetensors"
    )
    assert args["image_cond_model"]["args"]["model_name"] == str(
        root / "dinov3-vitl16-pretrain-lvd1689m"
    )
    assert args["rembg_model"]["args"]["model_name"] == str(root / "BiRefNet")
    assert args["low_vram"] is True
    # the original file on disk is untouched
    on_disk = json.loads((root / "TRELLIS.2-4B/pipeline.json").read_text())
    assert on_disk["args"]["rembg_model"]["args"]["model_name"] == "briaai/RMBG-2.0"
    assert weights.verify("trellis2", root).ok

    with staged_model_dir(plan.model_dir, plan.config, plan.links) as stage:
        staged = json.loads((stage / "pipeline.json").read_text())
        assert staged["args"]["models"]["sparse_structure_decoder"] == (
            "ckpts/ss_dec_conv3d_16l8_fp16"
        )
        assert (stage / "ckpts/ss_dec_conv3d_16l8_fp16.safetensors").is_file()
        assert (stage / "ckpts/tex_dec_next_dc_f16c32_fp16.json").is_file()
    assert not stage.exists()


def test_trellis2_weight_check_names_every_missing_file(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    _trellis2_tree(root)
    (root / "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.safetensors").unlink()
    (root / "TRELLIS.2-4B/ckpts/slat_flow_img2shape_dit_1_3B_1024_bf16.json").unlink()
    (root / "dinov3-vitl16-pretrain-lvd1689m/model.safetensors").unlink()
    (root / "BiRefNet/birefnet.py").unlink()
    with pytest.raises(BackendUnavailable) as err:
        Trellis2Backend(_settings(tmp_path)).check_weights()
    msg = err.value.message
    for name in (
        "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.safetensors",
        "slat_flow_img2shape_dit_1_3B_1024_bf16.json",
        "dinov3-vitl16-pretrain-lvd1689m/model.safetensors",
        "BiRefNet/birefnet.py",
    ):
        assert name in msg
    report = weights.verify("trellis2", root)
    assert not report.ok and len(report.missing) == 4


def test_trellis2_prefers_a_decoder_copied_into_its_own_dir(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    _trellis2_tree(root)
    for ext in ("json", "safetensors"):
        (root / f"TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.{ext}").replace(
            root / f"TRELLIS.2-4B/ckpts/ss_dec_conv3d_16l8_fp16.{ext}"
        )
    plan = Trellis2Backend(_settings(tmp_path)).check_weights()
    assert plan.links == {}


def test_trellis2_low_vram_setting_is_written_to_config(tmp_path: Path) -> None:
    _trellis2_tree(tmp_path / "weights")

    class ProposedSettings(Settings):  # the field this backend asks settings.py to add
        trellis2_low_vram: bool = True

    settings = ProposedSettings(weights_dir=tmp_path / "weights", trellis2_low_vram=False)
    assert Trellis2Backend(settings).check_weights().config["args"]["low_vram"] is False


# --- helpers --------------------------------------------------------------------------------------


def test_dinov2_checkpoint_names() -> None:
    assert dinov2_checkpoint_name("dinov2_vitl14_reg") == "dinov2_vitl14_reg4_pretrain.pth"
    assert dinov2_checkpoint_name("dinov2_vitl14") == "dinov2_vitl14_pretrain.pth"


def test_redirect_torch_hub_loads_listed_repos_locally(tmp_path: Path) -> None:
    calls: list[tuple[Any, ...]] = []

    def load(*a: Any, **k: Any) -> str:
        calls.append((a, k))
        return "model"

    hub = types.SimpleNamespace(load=load)
    with redirect_torch_hub(hub, {"facebookresearch/dinov2": tmp_path}):
        hub.load("facebookresearch/dinov2", "dinov2_vitl14_reg", pretrained=True)
        hub.load("other/repo", "x")
    assert calls[0] == (
        (str(tmp_path), "dinov2_vitl14_reg"),
        {"pretrained": True, "source": "local"},
    )
    assert calls[1] == (("other/repo", "x"), {})
    hub.load("facebookresearch/dinov2", "y")  # restored afterwards
    assert calls[2] == (("facebookresearch/dinov2", "y"), {})


def test_configure_offline_sets_local_paths(tmp_path: Path) -> None:
    from serve_app.backends.gpu.paths import configure_offline, local_paths

    env: dict[str, str] = {"PYTORCH_CUDA_ALLOC_CONF": "mine"}
    applied = configure_offline(local_paths(_settings(tmp_path)), env)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["TORCH_HOME"] == str(tmp_path / "weights/torch")
    assert env["U2NET_HOME"] == str(tmp_path / "weights/u2net")
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "mine"
    assert applied["TORCH_HOME"] == env["TORCH_HOME"]


_IMPORT_SPY = """
import importlib, importlib.abc, json, pkgutil, sys
HEAVY = {"torch", "trellis", "trellis2", "o_voxel", "rembg", "spconv", "flash_attn",
         "nvdiffrast", "xformers", "kaolin"}
attempted = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempted.append(name)
        return None
sys.meta_path.insert(0, Spy())
import serve_app.backends as backends
from serve_app.settings import Settings
for module in pkgutil.walk_packages(backends.__path__, "serve_app.backends."):
    importlib.import_module(module.name)
for name in ("serve_app.deployments", "serve_app.api.app", "serve_app.worker"):
    importlib.import_module(name)
for name in ("trellis", "trellis2"):  # made (not loaded) as a generator replica does first
    backends.create_backend(name, Settings())
print(json.dumps(attempted))
"""


def test_importing_backends_pulls_no_gpu_libraries() -> None:
    """In a fresh interpreter, importing every backend module (and making the GPU backends
    without loading them) never even tries to import a GPU library: whether or not one is
    installed here, an attempt is seen by the import spy."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_SPY],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# --- weights.py -----------------------------------------------------------------------------------


def test_every_pinned_revision_is_a_full_commit() -> None:
    for model in weights.model_names():
        for comp in weights.components(model):
            rev = getattr(comp, "revision", None) or getattr(comp, "commit", None)
            if rev is not None:
                assert len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def test_fetch_refuses_unpinned_revisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unpinned = weights.HubSnapshot(
        repo_id="a/b",
        revision=weights.PLACEHOLDER_REVISION,
        subdir="b",
        files=("x",),
        licence="MIT",
    )
    monkeypatch.setitem(weights.MODELS, "trellis", (unpinned,))
    with pytest.raises(weights.WeightsError) as err:
        weights.fetch("trellis", tmp_path)
    assert err.value.code == "weights_unpinned"


def test_fetch_uses_snapshot_download_with_pins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        for name in kwargs["allow_patterns"]:
            _write(Path(kwargs["local_dir"]) / name, b"weights")
        return kwargs["local_dir"]

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    report = weights.fetch("trellis2", tmp_path, token="hf_x", log=lambda m: None)
    assert report.ok and report.checked == len(weights.expected_files("trellis2"))
    repos = {(c["repo_id"], c["revision"]) for c in calls}
    assert ("microsoft/TRELLIS.2-4B", "af44b45f2e35a493886929c6d786e563ec68364d") in repos
    # the recorded sha256 catches a later corruption
    target = tmp_path / "TRELLIS.2-4B/pipeline.json"
    target.write_bytes(b"weightz")
    assert weights.verify("trellis2", tmp_path).mismatched == ["TRELLIS.2-4B/pipeline.json"]
    assert weights.verify("trellis2", tmp_path, hashes=False).ok


def test_fetch_of_gated_repo_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=lambda **k: None)
    )
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setitem(weights.MODELS, "trellis2", (weights.DINOV3,))
    with pytest.raises(weights.WeightsError) as err:
        weights.fetch("trellis2", tmp_path, log=lambda m: None)
    assert err.value.code == "weights_gated"


def test_verify_unknown_model() -> None:
    with pytest.raises(weights.WeightsError) as err:
        weights.verify("nope", Path("."))
    assert err.value.code == "unknown_model"
