"""Output formats: every format a task may ask for is derived here from the backend's GLB.

A GLB is read once into `MeshPart`s (world space, Y up, metres, one look per part) and each
format writer works from those. Writers are plain numpy so conversion is fast and byte-for-byte
deterministic; USDZ uses usd-core (`pxr`), imported only when a USDZ is asked for.
"""

from __future__ import annotations

import io
import math
import struct
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import trimesh
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from serve_app.errors import GenerationFailed, InvalidInput, Photo3DError
from serve_app.formats import FORMATS, FormatInfo

__all__ = [
    "FORMATS",
    "FormatInfo",
    "MeshPart",
    "convert",
    "convert_many",
    "read_glb",
    "sample_texture",
]


# A mesh with no colour at all: glTF's default material is white, but a light grey reads as
# "untextured" in previews and keeps shading visible.
_GREY = np.array([180, 180, 180, 255], dtype=np.uint8)
# Vertex colours become a texture for OBJ and USDZ (AR Quick Look ignores vertex colours):
# each face gets a CELL x CELL texel square holding its colours, interpolated and extrapolated.
_BAKE_CELL = 4
# A fixed zip timestamp keeps archives byte-for-byte deterministic.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_PNG_STRATEGY = cv2.IMWRITE_PNG_STRATEGY_FILTERED


@dataclass(frozen=True)
class MeshPart:
    """One mesh of a GLB scene in world space (metres, Y up) with its surface look resolved."""

    vertices: NDArray[np.float64]  # (V, 3)
    faces: NDArray[np.int64]  # (F, 3), counter-clockwise seen from outside
    normals: NDArray[np.float64]  # (V, 3) unit vertex normals
    uv: NDArray[np.float64] | None  # (V, 2), origin bottom-left as in OBJ and USD
    texture: NDArray[np.uint8] | None  # (H, W, 4) RGBA, row 0 at the top
    vertex_colors: NDArray[np.uint8] | None  # (V, 4) when the mesh has colours and no texture
    base_color: NDArray[np.uint8]  # (4,) RGBA; multiplies the texture, or is the colour
    opaque: bool
    double_sided: bool
    metallic: float
    roughness: float

    def colors_at_vertices(self) -> NDArray[np.uint8]:
        """RGBA colour at each vertex: texture sample, vertex colour, or the base colour."""
        if self.texture is not None and self.uv is not None:
            rgba = sample_texture(self.texture, self.uv) * (self.base_color / 255.0)
            return np.clip(rgba + 0.5, 0, 255).astype(np.uint8)
        if self.vertex_colors is not None:
            return self.vertex_colors
        return np.broadcast_to(self.base_color, (len(self.vertices), 4)).copy()


def read_glb(glb: bytes) -> list[MeshPart]:
    """Read a GLB into its meshes, node transforms applied; raises GenerationFailed if unusable."""
    try:
        scene = trimesh.load(io.BytesIO(glb), file_type="glb", force="scene", process=False)
        geometries = scene.dump() if isinstance(scene, trimesh.Scene) else [scene]
        parts = [
            _part(g) for g in geometries if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0
        ]
    except Photo3DError:
        raise
    except Exception as exc:  # trimesh raises many types for a corrupt file
        raise GenerationFailed(f"cannot read the GLB: {exc}", code="conversion_failed") from exc
    if not parts:
        raise GenerationFailed("the GLB holds no triangle mesh", code="conversion_failed")
    return parts


def convert(glb: bytes, fmt: str) -> bytes:
    """Convert a backend's GLB into `fmt` (a key of FORMATS); GLB comes back as is."""
    return convert_many(glb, [fmt])[fmt]


def convert_many(glb: bytes, formats: Sequence[str]) -> dict[str, bytes]:
    """Convert a GLB into several formats, reading it once."""
    for fmt in formats:
        if fmt not in FORMATS:
            known = ", ".join(FORMATS)
            raise InvalidInput(
                f"unknown format {fmt!r}; choose one of {known}", code="unknown_format"
            )
    out: dict[str, bytes] = {}
    parts: list[MeshPart] | None = None
    surfaces = _Surfaces([])
    for fmt in formats:
        if fmt == "glb":
            out[fmt] = glb
            continue
        if parts is None:
            parts = read_glb(glb)
            surfaces = _Surfaces(parts)
        try:
            out[fmt] = _WRITERS[fmt](parts, surfaces)
        except Photo3DError:
            raise
        except Exception as exc:
            raise GenerationFailed(
                f"converting to {fmt} failed: {exc}", code="conversion_failed"
            ) from exc
    return out


# --- reading -------------------------------------------------------------------------------


def _part(mesh: trimesh.Trimesh) -> MeshPart:
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
    uv: NDArray[np.float64] | None = None
    texture: NDArray[np.uint8] | None = None
    colors: NDArray[np.uint8] | None = None
    base = _GREY
    opaque, double_sided, metallic, roughness = True, False, 0.0, 1.0

    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material: Any = visual.material
        if isinstance(material, trimesh.visual.material.SimpleMaterial):
            material = material.to_pbr()
        if isinstance(material, trimesh.visual.material.PBRMaterial):
            factor = material.baseColorFactor
            has_texture = material.baseColorTexture is not None and visual.uv is not None
            if factor is not None:
                base = np.asarray(factor, dtype=np.uint8)
            elif has_texture:
                base = np.full(4, 255, dtype=np.uint8)  # glTF's default factor: the texture as is
            opaque = material.alphaMode in (None, "OPAQUE")
            double_sided = bool(material.doubleSided)
            # glTF reads a missing metallicFactor as 1 (metal), but generators leave it out
            # without meaning metal and photographed objects are dielectric: shiny-black
            # USDZs in AR would be the result.
            metallic = float(material.metallicFactor or 0.0)
            roughness = 1.0 if material.roughnessFactor is None else material.roughnessFactor
            if has_texture:
                uv = np.asarray(visual.uv, dtype=np.float64)[:, :2]
                texture = np.asarray(material.baseColorTexture.convert("RGBA"), dtype=np.uint8)
    elif isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind in ("vertex", "face"):
        colors = np.asarray(visual.vertex_colors, dtype=np.uint8)[:, :4]
        base = np.full(4, 255, dtype=np.uint8)

    return MeshPart(
        vertices=vertices,
        faces=faces,
        normals=normals,
        uv=uv,
        texture=texture,
        vertex_colors=colors,
        base_color=base,
        opaque=opaque,
        double_sided=double_sided,
        metallic=metallic,
        roughness=float(roughness),
    )


def sample_texture(
    texture: NDArray[np.uint8], uv: NDArray[np.floating[Any]]
) -> NDArray[np.float32]:
    """Bilinear, repeating lookup of RGBA texture colours at UVs (origin bottom-left), 0..255."""
    h, w = texture.shape[:2]
    # One uint32 gather per corner instead of four byte gathers.
    packed = np.ascontiguousarray(texture).view(np.uint32).reshape(-1)
    x = uv[:, 0].astype(np.float32) * w - 0.5
    y = (1.0 - uv[:, 1].astype(np.float32)) * h - 0.5
    x0f = np.floor(x)
    y0f = np.floor(y)
    fx = (x - x0f)[:, None]
    fy = (y - y0f)[:, None]
    x0 = x0f.astype(np.int64) % w
    x1 = (x0 + 1) % w
    y0 = y0f.astype(np.int64) % h
    y1 = (y0 + 1) % h * w  # row offsets into the flat texture
    y0 *= w

    def texel(index: NDArray[np.int64]) -> NDArray[np.float32]:
        return packed[index].view(np.uint8).reshape(-1, 4).astype(np.float32)

    top = texel(y0 + x0)
    top += (texel(y0 + x1) - top) * fx
    bottom = texel(y1 + x0)
    bottom += (texel(y1 + x1) - bottom) * fx
    top += (bottom - top) * fy
    return top


# --- shared geometry helpers --------------------------------------------------------------------


def _weld(vertices: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices of distinct positions and, per vertex, its welded index.

    Backends split vertices along UV seams and hard normals; welding positions closes the
    surface again (slicers need STLs watertight). Copies within a millionth of the model's
    size are welded too: seams that went through float32 or a transform rarely match exactly,
    and rounding to a grid would still split pairs that straddle a grid line."""
    if len(vertices) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    unique, first, inverse = np.unique(vertices, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    tolerance = float(np.ptp(vertices, axis=0).max()) * 1e-6
    if tolerance > 0:
        pairs: NDArray[np.int64] = cKDTree(unique).query_pairs(tolerance, output_type="ndarray")
    else:
        pairs = np.zeros((0, 2), dtype=np.int64)
    if len(pairs):
        graph = coo_matrix(
            (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(unique), len(unique))
        )
        _, label = connected_components(graph, directed=False)
        _, representative = np.unique(label, return_index=True)
        first, inverse = first[representative], label[inverse]
    return first.astype(np.int64), inverse.astype(np.int64)


def _welded(part: MeshPart) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
    """(distinct-position vertex indices, welded index per vertex, mask of faces to keep)."""
    first, inverse = _weld(part.vertices)
    f = inverse[part.faces]
    # Faces that lose a corner to welding have no area; dropping them keeps edges manifold.
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    return first, inverse, keep


def _bake_vertex_colors(
    faces: NDArray[np.int64], colors: NDArray[np.uint8]
) -> tuple[NDArray[np.float64], NDArray[np.uint8]]:
    """Per-corner UVs (F*3, 2) and a texture that reproduce linearly interpolated vertex colours.

    Texel (i, j) of a face's cell holds the colour's linear function at that texel, so bilinear
    sampling inside the triangle gives back exactly what vertex colours would."""
    n, c = len(faces), _BAKE_CELL
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    j, i = np.meshgrid(np.arange(c), np.arange(c))  # j: column (u), i: row (down)
    l1 = j / (c - 1)
    l2 = i / (c - 1)
    weights = np.stack([1 - l1 - l2, l1, l2], axis=-1).astype(np.float32)  # (c, c, 3)
    corner = colors[faces].astype(np.float32)  # (F, 3, 4)
    cells = np.einsum("ijk,fkc->fijc", weights, corner)
    cells = np.clip(cells + 0.5, 0, 255).astype(np.uint8)
    grid = np.zeros((rows * cols, c, c, 4), dtype=np.uint8)
    grid[:n] = cells
    texture = (
        grid.reshape(rows, cols, c, c, 4).transpose(0, 2, 1, 3, 4).reshape(rows * c, cols * c, 4)
    )

    h, w = texture.shape[:2]
    ox = (np.arange(n) % cols) * c
    oy = (np.arange(n) // cols) * c
    corners = np.array([[0.5, 0.5], [c - 0.5, 0.5], [0.5, c - 0.5]])  # texel centres in a cell
    px = ox[:, None] + corners[None, :, 0]
    py = oy[:, None] + corners[None, :, 1]
    uv = np.stack([px / w, 1.0 - py / h], axis=-1).reshape(-1, 2)
    return uv, np.ascontiguousarray(texture)


def _png(texture: NDArray[np.uint8], factor: NDArray[np.uint8], opaque: bool) -> bytes:
    """PNG of a texture with its base colour factor multiplied in (OBJ and USDZ have none)."""
    if np.any(factor != 255):
        texture = ((texture.astype(np.uint32) * factor + 127) // 255).astype(np.uint8)
    # OpenCV's encoder with zlib level 1 and the FILTERED strategy is 2-3x faster than
    # Pillow's on large textures (0.55 s against 1.4 s at 4096^2) for the same size.
    bgr = texture[..., [2, 1, 0]] if opaque else texture[..., [2, 1, 0, 3]]
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, _PNG_STRATEGY]
    ok, encoded = cv2.imencode(".png", bgr, params)
    if not ok:
        raise GenerationFailed("could not encode the texture as PNG", code="conversion_failed")
    return encoded.tobytes()


@dataclass(frozen=True)
class _Surface:
    """How a part's colour is written: UVs (per vertex or per face corner) and a PNG."""

    uv: NDArray[np.float64] | None
    per_corner: bool
    png: bytes | None


class _Surfaces:
    """Each part's surface, made at most once per conversion (OBJ and USDZ share them)."""

    def __init__(self, parts: list[MeshPart]) -> None:
        self._parts = parts
        self._made: dict[int, _Surface] = {}

    def __getitem__(self, k: int) -> _Surface:
        if k not in self._made:
            self._made[k] = self._make(self._parts[k])
        return self._made[k]

    @staticmethod
    def _make(part: MeshPart) -> _Surface:
        if part.texture is not None and part.uv is not None:
            return _Surface(part.uv, False, _png(part.texture, part.base_color, part.opaque))
        if part.vertex_colors is not None:
            uv, texture = _bake_vertex_colors(part.faces, part.vertex_colors)
            return _Surface(uv, True, _png(texture, part.base_color, part.opaque))
        return _Surface(None, False, None)


def _rows(line: str, values: NDArray[Any]) -> str:
    """Format each row of a 2-D array with `line` (a %-format ending in a newline) at once."""
    if len(values) == 0:
        return ""
    text: str = (line * len(values)) % tuple(values.ravel().tolist())
    return text


# --- writers -------------------------------------------------------------------------------------


def _to_obj(parts: list[MeshPart], surfaces: _Surfaces) -> bytes:
    obj = ["# photo3d\nmtllib model.mtl\n"]
    mtl = ["# photo3d\n"]
    files: dict[str, bytes] = {}
    v_base = vt_base = vn_base = 1  # OBJ indices are 1-based and global across groups
    for k, part in enumerate(parts):
        first, inverse, keep = _welded(part)
        faces = inverse[part.faces]
        surface = surfaces[k]
        uv = surface.uv if surface.png is not None else None
        name = f"material_{k}"
        obj.append(f"o part_{k}\nusemtl {name}\n")
        obj.append(_rows("v %.7g %.7g %.7g\n", part.vertices[first]))
        obj.append(_rows("vn %.4f %.4f %.4f\n", part.normals))
        corners = (
            np.arange(3 * len(part.faces)).reshape(-1, 3) if surface.per_corner else part.faces
        )
        if uv is not None:
            obj.append(_rows("vt %.6f %.6f\n", uv))
            idx = np.stack([faces + v_base, corners + vt_base, part.faces + vn_base], axis=-1)
            obj.append(_rows("f %d/%d/%d %d/%d/%d %d/%d/%d\n", idx[keep].reshape(-1, 9)))
            vt_base += len(uv)
        else:
            idx = np.stack([faces + v_base, part.faces + vn_base], axis=-1)
            obj.append(_rows("f %d//%d %d//%d %d//%d\n", idx[keep].reshape(-1, 6)))
        v_base += len(first)
        vn_base += len(part.normals)

        mtl.append(f"newmtl {name}\nKa 0 0 0\nKs 0 0 0\nillum 1\n")
        if surface.png is None:
            r, g, b, a = (part.base_color / 255.0).tolist()
            mtl.append(f"Kd {r:.4f} {g:.4f} {b:.4f}\nd {a:.4f}\n")
        else:
            # The base colour factor is already in the PNG; readers multiply Kd with map_Kd.
            png = "model.png" if len(parts) == 1 else f"model_{k}.png"
            files[png] = surface.png
            mtl.append(f"Kd 1 1 1\nd 1\nmap_Kd {png}\n")
            if not part.opaque:
                mtl.append(f"map_d {png}\n")
        mtl.append("\n")

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        entries = {"model.obj": "".join(obj).encode(), "model.mtl": "".join(mtl).encode()}
        for name, data in {**entries, **files}.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16  # rw-r--r-- once unzipped, not 0o000
            # PNGs are already compressed; deflating them again only costs time. Level 1
            # deflates OBJ text 5x faster than the default for about 15% more bytes.
            if name.endswith(".png"):
                archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)
            else:
                archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return buf.getvalue()


def _closed_geometry(
    parts: list[MeshPart], with_colors: bool
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    """All parts welded into one vertex array: (vertices, faces, RGBA colours 0..255)."""
    vertices, faces, colors = [], [], []
    offset = 0
    for part in parts:
        first, inverse, keep = _welded(part)
        welded = inverse[part.faces][keep]
        if with_colors:
            # Seam copies sample the texture in different charts; average them.
            rgba = part.colors_at_vertices().astype(np.float64)
            counts = np.bincount(inverse, minlength=len(first))
            summed = np.stack(
                [np.bincount(inverse, rgba[:, ch], minlength=len(first)) for ch in range(4)],
                axis=-1,
            )
            colors.append(summed / np.maximum(counts, 1)[:, None])
        else:
            colors.append(np.zeros((len(first), 4)))
        vertices.append(part.vertices[first])
        faces.append(welded + offset)
        offset += len(first)
    return np.concatenate(vertices), np.concatenate(faces), np.concatenate(colors)


def _to_stl(parts: list[MeshPart], surfaces: _Surfaces) -> bytes:
    vertices, faces, _ = _closed_geometry(parts, with_colors=False)
    # Slicers and CAD tools are Z up; glTF is Y up. Rotate +90 degrees about X so the object
    # stands on the print bed the way it stands in the viewer.
    v = np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=-1).astype(np.float32)
    tri = v[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    record = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    data = np.zeros(len(faces), dtype=record)
    data["normal"] = normals
    data["v"] = tri
    header = b"photo3d binary STL, Z up".ljust(80, b" ")
    return header + np.uint32(len(faces)).tobytes() + data.tobytes()


def _to_ply(parts: list[MeshPart], surfaces: _Surfaces) -> bytes:
    vertices, faces, colors = _closed_geometry(parts, with_colors=True)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment photo3d, Y up, metres\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    ).encode()
    vdata = np.zeros(len(vertices), dtype=np.dtype([("p", "<f4", 3), ("c", "u1", 3)]))
    vdata["p"] = vertices
    vdata["c"] = np.clip(colors[:, :3] + 0.5, 0, 255).astype(np.uint8)
    fdata = np.zeros(len(faces), dtype=np.dtype([("n", "u1"), ("i", "<i4", 3)]))
    fdata["n"] = 3
    fdata["i"] = faces
    return header + vdata.tobytes() + fdata.tobytes()


def _to_usdz(parts: list[MeshPart], surfaces: _Surfaces) -> bytes:
    try:
        from pxr import Gf, Kind, Sdf, Usd, UsdGeom, UsdShade, Vt
    except ImportError as exc:
        raise GenerationFailed(
            "USDZ export needs the usd-core package on this server", code="conversion_failed"
        ) from exc

    textures: dict[str, bytes] = {}
    stage = Usd.Stage.CreateInMemory()
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)  # glTF is Y up, metres
    UsdGeom.SetStageMetersPerUnit(stage, UsdGeom.LinearUnits.meters)
    model = UsdGeom.Xform.Define(stage, "/Model")
    stage.SetDefaultPrim(model.GetPrim())
    Usd.ModelAPI(model.GetPrim()).SetKind(Kind.Tokens.component)
    UsdGeom.Scope.Define(stage, "/Model/Materials")

    for k, part in enumerate(parts):
        surface = surfaces[k]
        mesh = UsdGeom.Mesh.Define(stage, f"/Model/Mesh_{k}")
        points = part.vertices.astype(np.float32)
        mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
        mesh.CreateFaceVertexCountsAttr(
            Vt.IntArray.FromNumpy(np.full(len(part.faces), 3, dtype=np.int32))
        )
        mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(part.faces.astype(np.int32).ravel()))
        mesh.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(part.normals.astype(np.float32)))
        mesh.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
        # The default scheme is Catmull-Clark: viewers would smooth the triangles away.
        mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
        mesh.CreateDoubleSidedAttr(part.double_sided)
        mesh.CreateExtentAttr(
            Vt.Vec3fArray.FromNumpy(np.stack([points.min(axis=0), points.max(axis=0)]))
        )

        material = UsdShade.Material.Define(stage, f"/Model/Materials/Material_{k}")
        shader = UsdShade.Shader.Define(stage, f"/Model/Materials/Material_{k}/Surface")
        shader.CreateIdAttr("UsdPreviewSurface")
        shader.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(part.metallic)
        shader.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(part.roughness)
        material.CreateSurfaceOutput().ConnectToSource(shader.ConnectableAPI(), "surface")
        diffuse = shader.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f)

        if surface.png is not None and surface.uv is not None:
            interpolation = (
                UsdGeom.Tokens.faceVarying if surface.per_corner else UsdGeom.Tokens.vertex
            )
            st = UsdGeom.PrimvarsAPI(mesh.GetPrim()).CreatePrimvar(
                "st", Sdf.ValueTypeNames.TexCoord2fArray, interpolation
            )
            st.Set(Vt.Vec2fArray.FromNumpy(surface.uv.astype(np.float32)))
            png = f"texture_{k}.png"
            textures[png] = surface.png

            path = f"/Model/Materials/Material_{k}"
            reader = UsdShade.Shader.Define(stage, f"{path}/StReader")
            reader.CreateIdAttr("UsdPrimvarReader_float2")
            reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
            reader.CreateOutput("result", Sdf.ValueTypeNames.Float2)
            image = UsdShade.Shader.Define(stage, f"{path}/BaseColor")
            image.CreateIdAttr("UsdUVTexture")
            image.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(png)
            image.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(
                reader.ConnectableAPI(), "result"
            )
            image.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("repeat")
            image.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("repeat")
            image.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
            image.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
            diffuse.ConnectToSource(image.ConnectableAPI(), "rgb")
            if not part.opaque:
                image.CreateOutput("a", Sdf.ValueTypeNames.Float)
                shader.CreateInput("opacity", Sdf.ValueTypeNames.Float).ConnectToSource(
                    image.ConnectableAPI(), "a"
                )
        else:
            r, g, b, a = (part.base_color / 255.0).tolist()
            diffuse.Set(Gf.Vec3f(r, g, b))
            if a < 1.0:
                shader.CreateInput("opacity", Sdf.ValueTypeNames.Float).Set(a)

        UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)

    # The crate (binary) format is what AR Quick Look expects as the package's first file;
    # USD writes it only to a file.
    with tempfile.TemporaryDirectory(prefix="photo3d-usdz-") as tmp:
        layer_path = Path(tmp) / "model.usdc"
        if not stage.GetRootLayer().Export(str(layer_path)):
            raise GenerationFailed("USD could not write the stage", code="conversion_failed")
        layer = layer_path.read_bytes()
    return _usdz_package({"model.usdc": layer, **textures})


def _usdz_package(files: dict[str, bytes]) -> bytes:
    """A USDZ archive: uncompressed, each file's data 64-byte aligned, root layer first.

    UsdUtils.CreateNewUsdzPackage stamps the current time into the zip; writing the (simple)
    package format here keeps the bytes deterministic."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            # Local header is 30 bytes + name + extra; pad the extra field (id 0x1986, as USD's
            # own writer does) so the data starts on a 64-byte boundary.
            start = buf.tell() + 30 + len(name.encode()) + 4
            pad = -start % 64
            info.extra = struct.pack("<HH", 0x1986, pad) + bytes(pad)
            archive.writestr(info, data)
    return buf.getvalue()


_WRITERS = {"obj": _to_obj, "stl": _to_stl, "ply": _to_ply, "usdz": _to_usdz}
