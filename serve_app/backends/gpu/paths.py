"""Where the GPU backends find their weights on this machine, and how their pipelines are
made to load from there: local paths, the offline environment, weight-directory checks, torch
hub redirection and staged model folders. Serving reads weights from disk only (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.backends.gpu import weights
from serve_app.errors import (
    BackendUnavailable,
)
from serve_app.settings import Settings

# Serving reads weights from disk only (docs/gpu.md): these make huggingface_hub / transformers fail
# fast instead of reaching for the network if anything still asks for a hub id.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


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

    @property
    def u2net_file(self) -> Path:
        """rembg's U2-Net: TRELLIS's background removal and the cpu backend's learned matte."""
        return self.u2net_home / weights.U2NET_FILENAME


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
