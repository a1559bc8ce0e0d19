"""Model weights for the GPU backends: pinned sources, the expected file layout, `fetch` and
`verify`.

Serving never downloads (docs/gpu.md): `fetch` runs where the internet is reachable,
the resulting directory is copied or mounted on the GPU hosts (as `PHOTO3D_WEIGHTS_DIR`, `/models`
in the GPU image), and `verify` checks it there. Layout under that root:

    TRELLIS-image-large/                 microsoft/TRELLIS-image-large (pipeline.json, ckpts/)
    TRELLIS.2-4B/                        microsoft/TRELLIS.2-4B (pipeline.json, ckpts/)
    dinov3-vitl16-pretrain-lvd1689m/     facebook/dinov3-vitl16-pretrain-lvd1689m (gated)
    BiRefNet/                            ZhengPeng7/BiRefNet (background removal for TRELLIS.2)
    torch/hub/facebookresearch_dinov2_main/   DINOv2 hub code (TORCH_HOME=<root>/torch)
    torch/hub/checkpoints/dinov2_vitl14_reg4_pretrain.pth
    u2net/u2net.onnx                     rembg's U2-Net (U2NET_HOME=<root>/u2net)

Revisions: the Hugging Face commits below were not read from the Hub (unreachable where this was
written); they are the revisions that several independent public deployments pin for these repos
(e.g. a TRELLIS.2 worker's `download_models.py` pins TRELLIS.2-4B@af44b45f…, TRELLIS-image-large@
25e0d31f…, dinov3@ea8dc286…, BiRefNet@e2bf8e44…). Check them once with
`huggingface_hub.HfApi().model_info(repo_id, revision=…)` before the first fetch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.errors import Photo3DError

# A revision that must be replaced by a real commit before `fetch` will run.
PLACEHOLDER_REVISION = "UNPINNED"

# Directory names under the weights root; the backends derive their defaults from these.
TRELLIS_DIRNAME = "TRELLIS-image-large"
TRELLIS2_DIRNAME = "TRELLIS.2-4B"
DINOV3_DIRNAME = "dinov3-vitl16-pretrain-lvd1689m"
BIREFNET_DIRNAME = "BiRefNet"
TORCH_HOME_DIRNAME = "torch"
U2NET_DIRNAME = "u2net"
U2NET_FILENAME = "u2net.onnx"  # the name rembg looks for in $U2NET_HOME
# torch.hub names a cached GitHub repo <owner>_<name>_<ref>; keeping that name lets plain
# torch.hub.load('facebookresearch/dinov2', …) find it too.
DINOV2_HUB_DIRNAME = "facebookresearch_dinov2_main"
FETCH_RECORD = ".photo3d-weights-{model}.json"


class WeightsError(Photo3DError):
    """Weights cannot be fetched or do not verify."""

    code = "weights_error"
    http_status = 503


@dataclass(frozen=True)
class HubSnapshot:
    """Files taken from one Hugging Face repo at one commit into <root>/<subdir>."""

    repo_id: str
    revision: str
    subdir: str
    files: tuple[str, ...]
    licence: str
    gated: bool = False


@dataclass(frozen=True)
class UrlFile:
    """One file downloaded from a fixed URL to <root>/<path>."""

    url: str
    path: str
    licence: str
    checksum: str | None = None  # "md5:<hex>" or "sha256:<hex>"


@dataclass(frozen=True)
class GitArchive:
    """A GitHub repo at a pinned commit, unpacked into <root>/<subdir>."""

    repo: str  # owner/name
    commit: str
    subdir: str
    files: tuple[str, ...]  # the files that must exist afterwards
    licence: str


Component = HubSnapshot | UrlFile | GitArchive


def _ckpt(*names: str) -> tuple[str, ...]:
    # TRELLIS checkpoints are <name>.json (model config) + <name>.safetensors (weights):
    # trellis/models/__init__.py from_pretrained reads f"{path}.json" and f"{path}.safetensors".
    return tuple(f"ckpts/{n}.{ext}" for n in names for ext in ("json", "safetensors"))


_TRELLIS_REVISION = "25e0d31ffbebe4b5a97464dd851910efc3002d96"
_SS_DECODER = "ss_dec_conv3d_16l8_fp16"

# The checkpoints pipeline.json of microsoft/TRELLIS-image-large names under args.models.
TRELLIS_IMAGE_LARGE = HubSnapshot(
    repo_id="microsoft/TRELLIS-image-large",
    revision=_TRELLIS_REVISION,
    subdir=TRELLIS_DIRNAME,
    files=(
        "pipeline.json",
        *_ckpt(
            _SS_DECODER,
            "ss_flow_img_dit_L_16l8_fp16",
            "slat_dec_gs_swin8_B_64l8gs32_fp16",
            "slat_dec_rf_swin8_B_64l8r16_fp16",
            "slat_dec_mesh_swin8_B_64l8m256c_fp16",
            "slat_flow_img_dit_L_64l8p2_fp16",
        ),
    ),
    licence="MIT",
)

# TRELLIS.2-4B's pipeline.json borrows the sparse-structure decoder from TRELLIS-image-large
# ("microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16"): trellis2 needs these two files.
TRELLIS_SS_DECODER = HubSnapshot(
    repo_id="microsoft/TRELLIS-image-large",
    revision=_TRELLIS_REVISION,
    subdir=TRELLIS_DIRNAME,
    files=_ckpt(_SS_DECODER),
    licence="MIT",
)

TRELLIS2_4B = HubSnapshot(
    repo_id="microsoft/TRELLIS.2-4B",
    revision="af44b45f2e35a493886929c6d786e563ec68364d",
    subdir=TRELLIS2_DIRNAME,
    files=(
        "pipeline.json",
        *_ckpt(
            "ss_flow_img_dit_1_3B_64_bf16",
            "shape_dec_next_dc_f16c32_fp16",
            "slat_flow_img2shape_dit_1_3B_512_bf16",
            "slat_flow_img2shape_dit_1_3B_1024_bf16",
            "tex_dec_next_dc_f16c32_fp16",
            "slat_flow_imgshape2tex_dit_1_3B_512_bf16",
            "slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
        ),
    ),
    licence="MIT",
)

# TRELLIS.2's image encoder (trellis2/modules/image_feature_extractor.py, DinoV3FeatureExtractor:
# transformers DINOv3ViTModel.from_pretrained). Gated: the token's account must be approved by Meta.
DINOV3 = HubSnapshot(
    repo_id="facebook/dinov3-vitl16-pretrain-lvd1689m",
    revision="ea8dc2863c51be0a264bab82070e3e8836b02d51",
    subdir=DINOV3_DIRNAME,
    files=("config.json", "model.safetensors"),
    licence="DINOv3 License (Meta; gated, redistribution with notice)",
    gated=True,
)

# TRELLIS.2's background remover (trellis2/pipelines/rembg/BiRefNet.py:
# AutoModelForImageSegmentation.from_pretrained(..., trust_remote_code=True), so the repo's own
# model code files are needed). Upstream's pipeline.json names briaai/RMBG-2.0, which is
# CC BY-NC 4.0 (non-commercial) and gated; the MIT BiRefNet is the class's own default.
BIREFNET = HubSnapshot(
    repo_id="ZhengPeng7/BiRefNet",
    revision="e2bf8e4460fc8fa32bba5ea4d94b3233d367b0e4",
    subdir=BIREFNET_DIRNAME,
    files=("config.json", "model.safetensors", "birefnet.py", "BiRefNet_config.py"),
    licence="MIT",
)

# TRELLIS v1's image encoder: trellis/pipelines/trellis_image_to_3d.py _init_image_cond_model calls
# torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14_reg', pretrained=True): hub code from
# GitHub, weights via load_state_dict_from_url into $TORCH_HOME/hub/checkpoints.
DINOV2_HUB_CODE = GitArchive(
    repo="facebookresearch/dinov2",
    commit="7764ea0f912e53c92e82eb78a2a1631e92725fc8",
    subdir=f"{TORCH_HOME_DIRNAME}/hub/{DINOV2_HUB_DIRNAME}",
    files=("hubconf.py", "dinov2/hub/backbones.py"),
    licence="Apache-2.0",
)
DINOV2_VITL14_REG = UrlFile(
    url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
    path=f"{TORCH_HOME_DIRNAME}/hub/checkpoints/dinov2_vitl14_reg4_pretrain.pth",
    licence="Apache-2.0",
)

# TRELLIS v1 removes backgrounds with rembg.new_session('u2net'); rembg's u2net session downloads
# this file with pooch and this md5 (rembg/sessions/u2net.py), and skips the download when present.
U2NET = UrlFile(
    url="https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx",
    path=f"{U2NET_DIRNAME}/{U2NET_FILENAME}",
    licence="U-2-Net code Apache-2.0; licence of the ONNX export not stated",
    checksum="md5:60024c5c889badc19c04ad937298a77b",
)

MODELS: dict[str, tuple[Component, ...]] = {
    "trellis": (TRELLIS_IMAGE_LARGE, DINOV2_HUB_CODE, DINOV2_VITL14_REG, U2NET),
    "trellis2": (TRELLIS2_4B, TRELLIS_SS_DECODER, DINOV3, BIREFNET),
    # The CPU backend's optional learned matte (PHOTO3D_CPU_MATTE=u2net): the same file.
    "u2net": (U2NET,),
}


@dataclass
class VerifyReport:
    """What `verify` found: every problem, by path relative to the root."""

    model: str
    root: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.empty or self.mismatched)

    def describe(self) -> str:
        """One human-readable paragraph."""
        if self.ok:
            return f"{self.model}: {self.checked} files present under {self.root}"
        parts = []
        for label, paths in (
            ("missing", self.missing),
            ("empty", self.empty),
            ("checksum mismatch", self.mismatched),
        ):
            if paths:
                parts.append(f"{label}: {', '.join(paths)}")
        return f"{self.model} weights under {self.root} are incomplete; " + "; ".join(parts)


def model_names() -> list[str]:
    """Names `fetch` and `verify` accept."""
    return sorted(MODELS)


def components(model: str) -> tuple[Component, ...]:
    """The pinned sources one model needs."""
    if model not in MODELS:
        raise WeightsError(
            f"unknown model {model!r}; known: {', '.join(model_names())}", code="unknown_model"
        )
    return MODELS[model]


def expected_files(model: str) -> list[str]:
    """Every file (relative to the weights root) a model needs, in a stable order."""
    out: list[str] = []
    for comp in components(model):
        if isinstance(comp, UrlFile):
            out.append(comp.path)
        else:
            out.extend(f"{comp.subdir}/{name}" for name in comp.files)
    return list(dict.fromkeys(out))


def fetch(
    model: str,
    dest: Path,
    *,
    token: str | None = None,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Download everything `model` needs into `dest` (the weights root), then verify it.

    Needs the internet and, for Hugging Face repos, the optional `huggingface_hub` package.
    `token` is a Hugging Face token (needed for the gated DINOv3 repo)."""
    comps = components(model)
    unpinned = [_describe(c) for c in comps if _revision(c) == PLACEHOLDER_REVISION]
    if unpinned:
        raise WeightsError(
            "refusing to fetch unpinned weights (" + ", ".join(unpinned) + "): set the commit in "
            "serve_app/backends/gpu/weights.py so every host serves the same bytes",
            code="weights_unpinned",
        )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for comp in comps:
        log(f"fetching {_describe(comp)}")
        if isinstance(comp, HubSnapshot):
            _fetch_hub(comp, dest, token)
        elif isinstance(comp, UrlFile):
            _fetch_url(comp, dest)
        else:
            _fetch_git_archive(comp, dest)
    _write_record(model, dest)
    report = verify(model, dest)
    if not report.ok:
        raise WeightsError(report.describe(), code="weights_incomplete")
    return report


def verify(model: str, root: Path, *, hashes: bool = True) -> VerifyReport:
    """Check that every file `model` needs exists under `root` and is non-empty; with `hashes`,
    also check the known checksums and the sha256 recorded by `fetch` (when its record is there)."""
    root = Path(root)
    report = VerifyReport(model=model, root=root)
    known: dict[str, str] = {
        c.path: c.checksum for c in components(model) if isinstance(c, UrlFile) and c.checksum
    }
    recorded = _read_record(model, root) if hashes else {}
    for rel in expected_files(model):
        report.checked += 1
        path = root / rel
        if not path.is_file():
            report.missing.append(rel)
            continue
        size = path.stat().st_size
        if size == 0:
            report.empty.append(rel)
            continue
        if not hashes:
            continue
        expected = known.get(rel)
        if expected is None and rel in recorded:
            entry = recorded[rel]
            if entry.get("size") != size:
                report.mismatched.append(rel)
                continue
            expected = f"sha256:{entry['sha256']}"
        if expected is not None and not _checksum_matches(path, expected):
            report.mismatched.append(rel)
    return report


# --- internals --------------------------------------------------------------------------


def _revision(comp: Component) -> str:
    if isinstance(comp, HubSnapshot):
        return comp.revision
    if isinstance(comp, GitArchive):
        return comp.commit
    return comp.url


def _describe(comp: Component) -> str:
    if isinstance(comp, HubSnapshot):
        return f"{comp.repo_id}@{comp.revision} -> {comp.subdir}/"
    if isinstance(comp, GitArchive):
        return f"github.com/{comp.repo}@{comp.commit} -> {comp.subdir}/"
    return f"{comp.url} -> {comp.path}"


def _fetch_hub(comp: HubSnapshot, dest: Path, token: str | None) -> None:
    try:
        # Optional dependency: only the machine that fetches needs it, never a serving host.
        import huggingface_hub
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise WeightsError(
            "fetching weights needs huggingface_hub (pip install huggingface_hub)",
            code="weights_fetch_unavailable",
        ) from exc
    # huggingface_hub would also use $HF_TOKEN or a `huggingface-cli login` token by itself.
    get_token = getattr(huggingface_hub, "get_token", None)
    token = token or os.environ.get("HF_TOKEN") or (get_token() if get_token else None)
    if comp.gated and not token:
        raise WeightsError(
            f"{comp.repo_id} is gated: request access on its Hugging Face page, then pass a token "
            "(HF_TOKEN) whose account was approved",
            code="weights_gated",
        )
    try:
        snapshot_download(
            repo_id=comp.repo_id,
            revision=comp.revision,
            local_dir=str(dest / comp.subdir),
            allow_patterns=list(comp.files),
            token=token,
        )
    except Exception as exc:  # network, auth and revision errors all end the fetch the same way
        raise WeightsError(
            f"download of {comp.repo_id}@{comp.revision} failed: {type(exc).__name__}: {exc}",
            code="weights_fetch_failed",
        ) from exc


def _fetch_url(comp: UrlFile, dest: Path) -> None:
    target = dest / comp.path
    if (
        target.is_file()
        and target.stat().st_size > 0
        and (comp.checksum is None or _checksum_matches(target, comp.checksum))
    ):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(comp.url, timeout=60) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"download of {comp.url} failed: {exc}", code="weights_fetch_failed"
        ) from exc
    if comp.checksum is not None and not _checksum_matches(part, comp.checksum):
        part.unlink(missing_ok=True)
        raise WeightsError(f"{comp.url} does not match {comp.checksum}", code="weights_checksum")
    part.replace(target)


def _fetch_git_archive(comp: GitArchive, dest: Path) -> None:
    url = f"https://github.com/{comp.repo}/archive/{comp.commit}.zip"
    target = dest / comp.subdir
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise WeightsError(f"download of {url} failed: {exc}", code="weights_fetch_failed") from exc
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                archive.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise WeightsError(f"{url} is not a zip archive", code="weights_fetch_failed") from exc
        # GitHub archives hold one top-level folder, <name>-<commit>/.
        tops = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise WeightsError(f"{url}: unexpected archive layout", code="weights_fetch_failed")
        top = tops[0]
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(top), str(target))


def _checksum_matches(path: Path, checksum: str) -> bool:
    algo, _, expected = checksum.partition(":")
    digest = hashlib.new(algo)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == expected.lower()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_record(model: str, root: Path) -> None:
    """Record size + sha256 of what was fetched, so `verify` on the serving host catches a
    truncated or corrupted copy (Hugging Face publishes no checksums we could pin offline)."""
    record: dict[str, dict[str, Any]] = {}
    for rel in expected_files(model):
        path = root / rel
        if path.is_file():
            record[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    sources = [_describe(c) for c in components(model)]
    payload = {"model": model, "sources": sources, "files": record}
    record_path = root / FETCH_RECORD.format(model=model)
    record_path.write_text(json.dumps(payload, indent=2, sort_keys=True))


def _read_record(model: str, root: Path) -> dict[str, dict[str, Any]]:
    path = root / FETCH_RECORD.format(model=model)
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text()).get("files", {})
    except (OSError, ValueError):
        return {}
    return files if isinstance(files, dict) else {}
