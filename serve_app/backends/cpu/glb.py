"""A minimal, deterministic glTF 2.0 binary writer for one textured triangle mesh."""

from __future__ import annotations

import json
import struct

import numpy as np

_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_FLOAT = 5126
_UNSIGNED_SHORT = 5123
_UNSIGNED_INT = 5125
_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_CLAMP_TO_EDGE = 33071


def write_glb(
    positions: np.ndarray,
    normals: np.ndarray,
    uvs: np.ndarray,
    faces: np.ndarray,
    image: bytes,
    mime_type: str,
    name: str = "object",
) -> bytes:
    """GLB bytes of a mesh with a PBR base-colour texture (fixed layout, no timestamps)."""
    positions = np.ascontiguousarray(positions, dtype="<f4")
    normals = np.ascontiguousarray(normals, dtype="<f4")
    uvs = np.ascontiguousarray(uvs, dtype="<f4")
    small = len(positions) < 65536
    indices = np.ascontiguousarray(faces, dtype="<u2" if small else "<u4").ravel()

    chunks: list[bytes] = []
    views: list[dict[str, int]] = []
    offset = 0

    def add_view(data: bytes, target: int | None) -> int:
        nonlocal offset
        view: dict[str, int] = {"buffer": 0, "byteOffset": offset, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        padding = (-len(data)) % 4
        chunks.append(data + b"\0" * padding)
        offset += len(data) + padding
        views.append(view)
        return len(views) - 1

    accessors = [
        {
            "bufferView": add_view(positions.tobytes(), _ARRAY_BUFFER),
            "componentType": _FLOAT,
            "count": len(positions),
            "type": "VEC3",
            "min": [float(v) for v in positions.min(axis=0)],
            "max": [float(v) for v in positions.max(axis=0)],
        },
        {
            "bufferView": add_view(normals.tobytes(), _ARRAY_BUFFER),
            "componentType": _FLOAT,
            "count": len(normals),
            "type": "VEC3",
        },
        {
            "bufferView": add_view(uvs.tobytes(), _ARRAY_BUFFER),
            "componentType": _FLOAT,
            "count": len(uvs),
            "type": "VEC2",
        },
        {
            "bufferView": add_view(indices.tobytes(), _ELEMENT_ARRAY_BUFFER),
            "componentType": _UNSIGNED_SHORT if small else _UNSIGNED_INT,
            "count": len(indices),
            "type": "SCALAR",
        },
    ]
    image_view = add_view(image, None)
    document = {
        "asset": {"version": "2.0", "generator": "photo3d cpu backend"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [
            {
                "name": name,
                "primitives": [
                    {
                        "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2},
                        "indices": 3,
                        "material": 0,
                        "mode": 4,
                    }
                ],
            }
        ],
        "materials": [
            {
                "name": "photo",
                "pbrMetallicRoughness": {
                    "baseColorTexture": {"index": 0},
                    "metallicFactor": 0.0,
                    "roughnessFactor": 0.9,
                },
            }
        ],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [
            {
                "magFilter": _LINEAR,
                "minFilter": _LINEAR_MIPMAP_LINEAR,
                "wrapS": _CLAMP_TO_EDGE,
                "wrapT": _CLAMP_TO_EDGE,
            }
        ],
        "images": [{"bufferView": image_view, "mimeType": mime_type}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": offset}],
    }
    json_chunk = json.dumps(document, separators=(",", ":")).encode("utf-8")
    json_chunk += b" " * ((-len(json_chunk)) % 4)
    binary_chunk = b"".join(chunks)
    total = 12 + 8 + len(json_chunk) + 8 + len(binary_chunk)
    return b"".join(
        [
            struct.pack("<4sII", b"glTF", 2, total),
            struct.pack("<I4s", len(json_chunk), b"JSON"),
            json_chunk,
            struct.pack("<I4s", len(binary_chunk), b"BIN\0"),
            binary_chunk,
        ]
    )
