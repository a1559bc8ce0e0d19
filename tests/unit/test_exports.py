"""Output formats derived from a backend's GLB: each loads back in the tools people use."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh

from serve_app.errors import GenerationFailed, InvalidInput
from serve_app.exports import FORMATS, convert, convert_many, read_glb
from serve_app.formats import FORMAT_NAMES
from tests.support.meshes import uv_sphere
from tests.support.required import missing


def require_usd() -> None:
    """usd-core is a base dependency; only a broken install lacks it (a failure in CI)."""
    try:
        import pxr  # noqa: F401
    except ImportError:
        missing("usd-core (pxr) is not installed")


def red_texture(size: int = 32) -> np.ndarray:
    """Mostly red, with a little noise so PNG round trips are really checked."""
    rng = np.random.default_rng(1)
    tex = np.zeros((size, size, 3), dtype=np.uint8)
    tex[..., 0] = 200
    return tex + rng.integers(0, 30, tex.shape, dtype=np.uint8)


def glb_of(*meshes: trimesh.Trimesh) -> bytes:
    data: bytes = trimesh.Scene(list(meshes)).export(file_type="glb")
    return data


@pytest.fixture(scope="module")
def textured() -> tuple[trimesh.Trimesh, bytes]:
    mesh = uv_sphere(red_texture())
    return mesh, glb_of(mesh)


@pytest.fixture(scope="module")
def coloured() -> tuple[trimesh.Trimesh, bytes]:
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    rng = np.random.default_rng(2)
    colours = np.concatenate(
        [rng.integers(0, 256, (len(mesh.vertices), 3)), np.full((len(mesh.vertices), 1), 255)],
        axis=1,
    ).astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colours)
    return mesh, glb_of(mesh)


def test_every_task_format_has_a_media_type_and_file_name() -> None:
    assert set(FORMATS) == set(FORMAT_NAMES)
    assert FORMATS["glb"].media_type == "model/gltf-binary"
    assert FORMATS["obj"].media_type == "application/zip"
    assert FORMATS["obj"].filename == "model_obj.zip"
    assert FORMATS["stl"].media_type == "model/stl"
    assert FORMATS["ply"].media_type == "application/octet-stream"
    assert FORMATS["usdz"].media_type == "model/vnd.usdz+zip"
    for name, info in FORMATS.items():
        assert info.name == name
        assert info.filename.startswith("model")


def test_glb_comes_back_as_is(textured: tuple[trimesh.Trimesh, bytes]) -> None:
    _, glb = textured
    assert convert(glb, "glb") is glb


def test_unknown_format_is_refused_before_any_work() -> None:
    with pytest.raises(InvalidInput) as caught:
        convert(b"not even a glb", "fbx")
    assert caught.value.code == "unknown_format"
    assert "fbx" in caught.value.message


def test_unreadable_glb_is_a_domain_error() -> None:
    with pytest.raises(GenerationFailed):
        convert(b"glTF garbage", "stl")


def test_obj_zip_loads_with_its_texture(
    textured: tuple[trimesh.Trimesh, bytes], tmp_path: Path
) -> None:
    mesh, glb = textured
    archive = zipfile.ZipFile(io.BytesIO(convert(glb, "obj")))
    assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "model.png"]
    archive.extractall(tmp_path)

    loaded = trimesh.load(tmp_path / "model.obj", process=False)
    assert isinstance(loaded, trimesh.Trimesh)
    assert len(loaded.faces) == len(mesh.faces)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    # The PNG is lossless: the texture survives exactly.
    texture = np.asarray(loaded.visual.material.image.convert("RGB"))
    assert np.array_equal(texture, red_texture())
    # Positions are shared across the UV seam, so the OBJ itself is closed.
    loaded.merge_vertices(merge_tex=True, merge_norm=True)
    assert loaded.is_watertight


def test_stl_is_watertight_and_z_up(tmp_path: Path) -> None:
    # A tall ellipsoid: seams split its vertices, the STL must weld them back.
    mesh = uv_sphere(red_texture(), nlat=16, nlon=24)
    mesh.apply_scale([1.0, 2.0, 1.0])
    # Seam copies that drifted a little (float32, transforms) must still be welded.
    seam = np.arange(17) * 25 + 24  # the last column of the (nlat+1) x (nlon+1) grid
    mesh.vertices[seam] += 2e-7
    assert not mesh.is_watertight  # as a backend exports it
    data = convert(glb_of(mesh), "stl")

    loaded = trimesh.load(io.BytesIO(data), file_type="stl")
    assert loaded.is_watertight
    assert len(loaded.faces) == len(mesh.faces)
    assert loaded.volume == pytest.approx(mesh.volume, rel=1e-4)  # outward normals
    # glTF's Y (up) becomes Z, the print bed's up.
    assert np.ptp(loaded.vertices, axis=0) == pytest.approx([1.0, 1.0, 2.0], abs=1e-3)


def test_ply_has_vertex_colours_from_the_texture(textured: tuple[trimesh.Trimesh, bytes]) -> None:
    _, glb = textured
    data = convert(glb, "ply")
    assert data.startswith(b"ply\nformat binary_little_endian 1.0\n")

    loaded = trimesh.load(io.BytesIO(data), file_type="ply")
    assert loaded.visual.kind == "vertex"
    colours = loaded.visual.vertex_colors[:, :3].astype(float)
    assert colours[:, 0].min() > 190  # the red texture, sampled at every vertex
    assert colours[:, 1:].max() < 40
    assert loaded.is_watertight


def test_vertex_coloured_mesh_keeps_its_colours_in_every_format(
    coloured: tuple[trimesh.Trimesh, bytes], tmp_path: Path
) -> None:
    mesh, glb = coloured
    ply = trimesh.load(io.BytesIO(convert(glb, "ply")), file_type="ply")
    order = np.lexsort(np.round(ply.vertices, 5).T)
    expected = np.lexsort(np.round(mesh.vertices, 5).T)
    assert np.array_equal(
        ply.visual.vertex_colors[order, :3], mesh.visual.vertex_colors[expected, :3]
    )

    # OBJ has no vertex colours in its standard: they are baked into a texture.
    zipfile.ZipFile(io.BytesIO(convert(glb, "obj"))).extractall(tmp_path)
    obj = trimesh.load(tmp_path / "model.obj", process=False)
    sampled = obj.visual.to_color().vertex_colors[:, :3].astype(int)
    # Each OBJ vertex is a face corner; find the source vertex at the same position.
    pairs = zip(mesh.vertices, mesh.visual.vertex_colors, strict=True)
    source = {tuple(np.round(v, 5)): c for v, c in pairs}
    want = np.array([source[tuple(np.round(v, 5))][:3] for v in obj.vertices], dtype=int)
    assert np.abs(sampled - want).max() <= 2


def test_every_format_is_deterministic(textured: tuple[trimesh.Trimesh, bytes]) -> None:
    _, glb = textured
    for fmt in ("obj", "stl", "ply", "usdz"):
        if fmt == "usdz":
            require_usd()
        assert convert(glb, fmt) == convert(glb, fmt), fmt


def test_scene_with_several_meshes_is_flattened_with_transforms() -> None:
    sphere = uv_sphere(red_texture())
    box = trimesh.creation.box(extents=[0.2, 0.2, 0.2])
    box.visual.face_colors = [0, 200, 0, 255]
    scene = trimesh.Scene()
    scene.add_geometry(sphere)
    scene.add_geometry(box, transform=trimesh.transformations.translation_matrix([2.0, 0, 0]))
    glb: bytes = scene.export(file_type="glb")

    parts = read_glb(glb)
    assert len(parts) == 2
    assert max(p.vertices[:, 0].max() for p in parts) == pytest.approx(2.1)

    out = convert_many(glb, ["stl", "obj", "glb"])
    assert set(out) == {"stl", "obj", "glb"}
    stl = trimesh.load(io.BytesIO(out["stl"]), file_type="stl")
    assert len(stl.faces) == len(sphere.faces) + len(box.faces)
    assert stl.bounds[1][0] == pytest.approx(2.1)
    names = zipfile.ZipFile(io.BytesIO(out["obj"])).namelist()
    assert {"model.obj", "model.mtl", "model_0.png", "model_1.png"} <= set(names)


def test_usdz_is_a_valid_package_with_a_textured_material(
    textured: tuple[trimesh.Trimesh, bytes], tmp_path: Path
) -> None:
    require_usd()
    from pxr import Usd, UsdGeom, UsdShade, UsdValidation

    mesh, glb = textured
    data = convert(glb, "usdz")
    path = tmp_path / "model.usdz"
    path.write_bytes(data)

    # Package rules: stored (not deflated), data 64-byte aligned, root layer first.
    entries = zipfile.ZipFile(path).infolist()
    assert entries[0].filename.endswith(".usdc")
    for entry in entries:
        assert entry.compress_type == zipfile.ZIP_STORED
        offset = entry.header_offset + 30 + len(entry.filename) + len(entry.extra)
        assert offset % 64 == 0

    stage = Usd.Stage.Open(str(path))
    assert stage is not None
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.y
    assert UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert stage.GetDefaultPrim().IsValid()

    meshes = [UsdGeom.Mesh(p) for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
    assert len(meshes) == 1
    assert len(meshes[0].GetFaceVertexCountsAttr().Get()) == len(mesh.faces)
    material, _ = UsdShade.MaterialBindingAPI(meshes[0].GetPrim()).ComputeBoundMaterial()
    assert material

    shaders = {UsdShade.Shader(p).GetIdAttr().Get(): p for p in stage.Traverse()}
    assert "UsdPreviewSurface" in shaders
    texture = UsdShade.Shader(shaders["UsdUVTexture"]).GetInput("file").Get()
    assert texture.resolvedPath  # found inside the package

    registry = UsdValidation.ValidationRegistry()
    context = UsdValidation.ValidationContext(registry.GetOrLoadAllValidators())
    problems = [e.GetMessage() for e in context.Validate(stage)]
    assert problems == []


def test_usdz_bakes_vertex_colours_into_a_texture(
    coloured: tuple[trimesh.Trimesh, bytes], tmp_path: Path
) -> None:
    require_usd()
    from pxr import Usd, UsdGeom, UsdShade

    _, glb = coloured
    path = tmp_path / "model.usdz"
    path.write_bytes(convert(glb, "usdz"))
    stage = Usd.Stage.Open(str(path))
    mesh = next(UsdGeom.Mesh(p) for p in stage.Traverse() if p.IsA(UsdGeom.Mesh))
    st = UsdGeom.PrimvarsAPI(mesh.GetPrim()).GetPrimvar("st")
    assert st.GetInterpolation() == UsdGeom.Tokens.faceVarying
    material, _ = UsdShade.MaterialBindingAPI(mesh.GetPrim()).ComputeBoundMaterial()
    assert material


def test_usdz_without_usd_core_is_a_clear_failure(
    textured: tuple[trimesh.Trimesh, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, glb = textured
    monkeypatch.setitem(sys.modules, "pxr", None)  # makes `from pxr import ...` fail
    with pytest.raises(GenerationFailed) as caught:
        convert(glb, "usdz")
    assert "usd-core" in caught.value.message
