"""Test meshes shaped like a backend's output."""

from __future__ import annotations

import numpy as np
import trimesh
from PIL import Image


def uv_sphere(texture: np.ndarray | None, nlat: int = 16, nlon: int = 24) -> trimesh.Trimesh:
    """A closed radius-0.5 sphere whose vertices are split along the UV seam, like a backend's."""
    lat = np.linspace(0, np.pi, nlat + 1)
    lon = np.linspace(0, 2 * np.pi, nlon + 1)  # first and last column coincide: the seam
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    xyz = np.stack([np.sin(la) * np.sin(lo), np.cos(la), np.sin(la) * np.cos(lo)], -1) * 0.5
    uv = np.stack([lo / (2 * np.pi), 1 - la / np.pi], -1).reshape(-1, 2)
    idx = np.arange((nlat + 1) * (nlon + 1)).reshape(nlat + 1, nlon + 1)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    # The pole rows hold one real triangle per quad; the other would have no area.
    faces = np.concatenate(
        [np.stack([a, b, c], -1)[:-1].reshape(-1, 3), np.stack([a, c, d], -1)[1:].reshape(-1, 3)]
    )
    mesh = trimesh.Trimesh(xyz.reshape(-1, 3), faces, process=False)
    if texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=0.8
        )
        mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return mesh
