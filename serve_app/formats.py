"""The one registry of output formats. The generation options, the `photo3d generate` CLI
choices, the download route and the web page's list are all derived from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FormatInfo:
    """How one output format is served and shown: media type, download file name, what it is
    (for the API docs) and what it is for (for the web page)."""

    name: str
    media_type: str
    filename: str
    description: str
    label: str
    use: str


FORMATS: dict[str, FormatInfo] = {
    "glb": FormatInfo(
        "glb",
        "model/gltf-binary",
        "model.glb",
        "glTF binary, PBR textured",
        "GLB",
        "Web, AR, Blender, game engines",
    ),
    "obj": FormatInfo(
        "obj",
        "application/zip",
        "model_obj.zip",
        "Wavefront OBJ + MTL + PNG texture, zipped",
        "OBJ",
        "Most 3D editors (zip with texture)",
    ),
    "stl": FormatInfo(
        "stl",
        "model/stl",
        "model.stl",
        "binary STL, Z up, for 3D printing",
        "STL",
        "3D printing (shape only)",
    ),
    # PLY has no media type registered with IANA (`model/ply` is not one, and neither browsers
    # nor Python's mimetypes know it); octet-stream is what servers send for .ply, and it makes
    # browsers download the file rather than guess.
    "ply": FormatInfo(
        "ply",
        "application/octet-stream",
        "model.ply",
        "binary PLY with vertex colours",
        "PLY",
        "Point-cloud and mesh tools",
    ),
    "usdz": FormatInfo(
        "usdz",
        "model/vnd.usdz+zip",
        "model.usdz",
        "USDZ for AR Quick Look (iOS, visionOS)",
        "USDZ",
        "Apple AR Quick Look",
    ),
}

FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)

# The option type, built from the registry (a Literal gives the API schema its enum).
OutputFormat = Literal[FORMAT_NAMES]  # type: ignore[valid-type]
