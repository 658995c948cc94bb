"""Geodesic polyhedra, whose vertices serve as the fixed projection basis of mip-NeRF 360's encoding.

A base polyhedron (icosahedron or octahedron) has every triangular face subdivided with tesselation
frequency v (barycentric weights i/v, j/v, k/v with i + j + k = v), the new vertices are pushed onto the unit
sphere, duplicates shared by neighbouring faces are merged, and optionally one of each antipodal pair is
dropped. Everything is numpy (it runs once, when a model is built); the vertex order is that of the reference.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np


def compute_sq_dist(mat0: np.ndarray, mat1: Optional[np.ndarray] = None) -> np.ndarray:
    """Squared Euclidean distances between the columns of mat0 [d, n] and of mat1 [d, m] (default mat0).

    Returns:
        [n, m] non-negative distances.
    """
    if mat1 is None:
        mat1 = mat0
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b; rounding can make it slightly negative, so clip at 0.
    sq_dist = np.sum(mat0**2, 0)[:, None] + np.sum(mat1**2, 0)[None, :] - 2 * mat0.T @ mat1
    return np.maximum(0, sq_dist)


def compute_tesselation_weights(v: int) -> np.ndarray:
    """Barycentric weights of the points of a triangle subdivided with frequency v.

    Returns:
        [(v + 1) (v + 2) / 2, 3] rows (i, j, v - i - j) / v, i outer and j inner, both ascending.
    """
    if v < 1:
        raise ValueError(f'The tesselation frequency v must be >= 1, got {v}')
    rows = [(i, j, v - i - j) for i in range(v + 1) for j in range(v + 1 - i)]
    return np.array(rows) / v


def tesselate_geodesic(base_verts: np.ndarray, base_faces: np.ndarray, v: int, eps: float = 1e-4) -> np.ndarray:
    """Subdivide every face of a polyhedron inscribed in the unit sphere and project the points onto it.

    Args:
        base_verts: [n, 3] vertex coordinates.
        base_faces: [f, 3] vertex indices of each triangular face.
        v: tesselation frequency (1 returns the base vertices, in face order).
        eps: squared distance under which two vertices count as the same.

    Returns:
        [m, 3] unique unit vertices, ordered by their first appearance when faces are visited in order.
    """
    if not isinstance(v, int):
        raise ValueError(f'The tesselation frequency v must be an int, got {v!r}')
    tri_weights = compute_tesselation_weights(v)

    verts = np.concatenate([tri_weights @ base_verts[face, :] for face in base_faces], 0)
    verts = verts / np.sqrt(np.sum(verts**2, 1, keepdims=True))

    # Each vertex is represented by the first vertex within eps of it; keep each representative once.
    is_close = compute_sq_dist(verts.T) <= eps
    first_match = np.argmax(is_close, axis=1)  # A vertex always matches itself, so argmax finds a True.
    return verts[np.unique(first_match), :]


def generate_basis(base_shape: str, angular_tesselation: int, remove_symmetries: bool = True,
                   eps: float = 1e-4) -> np.ndarray:
    """Unit directions from a tesselated polyhedron, used as the projection basis of the encoding.

    Args:
        base_shape: 'icosahedron' or 'octahedron'.
        angular_tesselation: tesselation frequency, >= 1 (1 keeps the polyhedron's own vertices).
        remove_symmetries: if True keep only one of each pair of antipodal directions (projections onto x and
            -x would be redundant).
        eps: squared-distance threshold for detecting antipodal pairs.

    Returns:
        [n, 3] float64 array with one direction per ROW (the reference's docstring says [3, n], but it returns,
        as this does, [n, 3]; the model transposes it). Columns are in (z, y, x) order relative to the polyhedron
        coordinates below, as in the reference. Icosahedron at 2 gives 21 rows, octahedron at 1 gives 3.
    """
    if base_shape == 'icosahedron':
        golden = (np.sqrt(5) + 1) / 2
        base_verts = np.array([
            (-1, 0, golden), (1, 0, golden), (-1, 0, -golden), (1, 0, -golden),
            (0, golden, 1), (0, golden, -1), (0, -golden, 1), (0, -golden, -1),
            (golden, 1, 0), (-golden, 1, 0), (golden, -1, 0), (-golden, -1, 0),
        ]) / np.sqrt(golden + 2)
        base_faces = np.array([
            (0, 4, 1), (0, 9, 4), (9, 5, 4), (4, 5, 8), (4, 8, 1), (8, 10, 1), (8, 3, 10), (5, 3, 8),
            (5, 2, 3), (2, 7, 3), (7, 10, 3), (7, 6, 10), (7, 11, 6), (11, 0, 6), (0, 1, 6), (6, 1, 10),
            (9, 0, 11), (9, 11, 2), (9, 2, 5), (7, 2, 11),
        ])
    elif base_shape == 'octahedron':
        base_verts = np.array([(0, 0, -1), (0, 0, 1), (0, -1, 0), (0, 1, 0), (-1, 0, 0), (1, 0, 0)])
        # A face is the three octahedron vertices adjacent to a corner of the cube [-1, 1]^3 (squared distance 2).
        # The (corner, vertex) hits are grouped as the reference groups them (reshape to [3, 8], transpose), which
        # permutes the faces but still yields all eight; the face order decides the vertex order.
        corners = np.array(list(itertools.product([-1, 1], repeat=3)))
        _, vert_idx = np.nonzero(compute_sq_dist(corners.T, base_verts.T) == 2)
        base_faces = np.sort(vert_idx.reshape(3, -1).T, 1)
    else:
        raise ValueError(f'base_shape must be \'icosahedron\' or \'octahedron\', got {base_shape!r}')
    verts = tesselate_geodesic(base_verts, base_faces, angular_tesselation)

    if remove_symmetries:
        # antipodal[i, j]: vertex i is the reflection of vertex j. Keep i if it has such a j with j >= i, i.e.
        # keep the first of each antipodal pair (and any vertex without one).
        antipodal = compute_sq_dist(verts.T, -verts.T) < eps
        verts = verts[np.any(np.triu(antipodal), 1), :]

    return verts[:, ::-1]
