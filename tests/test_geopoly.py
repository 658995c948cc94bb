"""Tests for mipnerf360.geopoly: exact agreement with the reference's basis arrays, plus geometric properties.

The hard-coded rows below were produced by running multinerf's internal/geopoly.py (numpy only) at commit
checked out in /tmp/multinerf, e.g. `geopoly.generate_basis('icosahedron', 2)[[0, 1, 7, 13, 20]].tolist()`.
"""

import numpy as np
import pytest

from mipnerf360 import geopoly

# From the reference: generate_basis('icosahedron', 2), rows 0, 1, 7, 13 and 20 (of 21).
_ICO2_ROWS = {
    0: [0.85065080835204, 0.0, 0.5257311121191336],
    1: [0.8090169943749475, 0.5000000000000001, 0.30901699437494745],
    7: [0.0, 0.5257311121191336, -0.85065080835204],
    13: [-0.30901699437494745, 0.8090169943749475, 0.5000000000000001],
    20: [-0.8090169943749475, 0.5000000000000001, -0.30901699437494745],
}
# From the reference: generate_basis('icosahedron', 1), all rows.
_ICO1 = [[0.85065080835204, 0.0, 0.5257311121191336], [0.5257311121191336, 0.85065080835204, 0.0],
         [0.85065080835204, 0.0, -0.5257311121191336], [0.0, 0.5257311121191336, -0.85065080835204],
         [-0.5257311121191336, 0.85065080835204, 0.0], [0.0, 0.5257311121191336, 0.85065080835204]]
# From the reference: generate_basis('octahedron', 1) and ('octahedron', 2), all rows.
_OCT1 = [[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]
_S = 0.7071067811865475
_OCT2 = [[0.0, 0.0, -1.0], [0.0, -_S, -_S], [0.0, -1.0, 0.0], [-_S, 0.0, -_S], [-_S, -_S, 0.0], [-1.0, 0.0, 0.0],
         [0.0, -_S, _S], [_S, -_S, 0.0], [_S, 0.0, -_S]]


def test_generate_basis_matches_reference_rows():
    basis = geopoly.generate_basis('icosahedron', 2)
    assert basis.shape == (21, 3)
    for i, row in _ICO2_ROWS.items():
        np.testing.assert_allclose(basis[i], row, rtol=0, atol=1e-15)
    np.testing.assert_allclose(geopoly.generate_basis('icosahedron', 1), _ICO1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(geopoly.generate_basis('octahedron', 1), _OCT1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(geopoly.generate_basis('octahedron', 2), _OCT2, rtol=0, atol=1e-15)


@pytest.mark.parametrize('shape,v,with_sym,without_sym', [
    ('icosahedron', 1, 12, 6), ('icosahedron', 2, 42, 21), ('icosahedron', 3, 92, 46), ('icosahedron', 4, 162, 81),
    ('octahedron', 1, 6, 3), ('octahedron', 2, 18, 9), ('octahedron', 3, 38, 19),
])
def test_generate_basis_counts_and_geometry(shape, v, with_sym, without_sym):
    full = geopoly.generate_basis(shape, v, remove_symmetries=False)
    half = geopoly.generate_basis(shape, v)
    # A geodesic polyhedron with frequency v has 10 v^2 + 2 (icosahedron) or 4 v^2 + 2 (octahedron) vertices.
    assert full.shape == (with_sym, 3) and half.shape == (without_sym, 3)
    for basis in (full, half):
        np.testing.assert_allclose(np.linalg.norm(basis, axis=1), 1, rtol=0, atol=1e-12)
        # All directions are distinct.
        gram = basis @ basis.T
        assert np.all(gram[~np.eye(len(basis), dtype=bool)] < 1 - 1e-6)
    # After removing symmetries no two directions are antipodal ...
    gram = half @ half.T
    assert np.all(gram > -1 + 1e-6)
    # ... and every vertex of the full set is a kept direction or the negation of one.
    match = np.abs(full @ half.T)
    assert np.all(np.max(match, axis=1) > 1 - 1e-12)
    # The kept set is the full set's rows whose antipode comes later (the first of each pair), in order.
    is_kept = np.array([np.any(np.all(np.abs(row - half) < 1e-12, axis=1)) for row in full])
    np.testing.assert_array_equal(full[is_kept], half)


def test_basis_projection_is_isotropic():
    # The icosahedral tesselation is a spherical 2-design: sum_i b_i b_i^T = (n / 3) I.
    basis = geopoly.generate_basis('icosahedron', 2)
    np.testing.assert_allclose(basis.T @ basis, 7 * np.eye(3), atol=1e-12)


def test_generate_basis_rejects_unknown_shape():
    with pytest.raises(ValueError, match='icosahedron'):
        geopoly.generate_basis('dodecahedron', 1)


def test_compute_sq_dist_matches_brute_force():
    rng = np.random.default_rng(0)
    mat0, mat1 = rng.normal(size=(3, 7)), rng.normal(size=(3, 5))
    brute = np.array([[np.sum((mat0[:, i] - mat1[:, j])**2) for j in range(5)] for i in range(7)])
    np.testing.assert_allclose(geopoly.compute_sq_dist(mat0, mat1), brute, atol=1e-12)
    self_dist = geopoly.compute_sq_dist(mat0)
    assert self_dist.shape == (7, 7)
    assert np.all(self_dist >= 0)  # Clipped, even where rounding would go negative.
    np.testing.assert_allclose(np.diag(self_dist), 0, atol=1e-12)
    np.testing.assert_allclose(self_dist, geopoly.compute_sq_dist(mat0, mat0))


def test_compute_tesselation_weights():
    # Reference order for v = 2: i outer, j inner, both ascending; rows are (i, j, v - i - j) / v.
    np.testing.assert_array_equal(
        geopoly.compute_tesselation_weights(2),
        [[0, 0, 1], [0, 0.5, 0.5], [0, 1, 0], [0.5, 0, 0.5], [0.5, 0.5, 0], [1, 0, 0]])
    for v in range(1, 7):
        w = geopoly.compute_tesselation_weights(v)
        assert w.shape == ((v + 1) * (v + 2) // 2, 3)
        np.testing.assert_allclose(w.sum(1), 1)
        assert len({tuple(row) for row in np.round(w * v).astype(int)}) == len(w)  # No duplicates.
    with pytest.raises(ValueError):
        geopoly.compute_tesselation_weights(0)


def test_tesselate_geodesic_v1_returns_base_vertices_in_face_order():
    verts = np.array([(0, 0, -1), (0, 0, 1), (0, -1, 0), (0, 1, 0), (-1, 0, 0), (1, 0, 0)], dtype=float)
    faces = np.array([(1, 3, 5), (0, 2, 4), (1, 2, 4), (0, 3, 5)])
    out = geopoly.tesselate_geodesic(verts, faces, 1)
    # Unique vertices in order of first appearance over the faces; the v = 1 weights (0, 0, 1), (0, 1, 0),
    # (1, 0, 0) visit each face's corners last to first: 5, 3, 1, then 4, 2, 0.
    np.testing.assert_allclose(out, verts[[5, 3, 1, 4, 2, 0]])
    with pytest.raises(ValueError):
        geopoly.tesselate_geodesic(verts, faces, 1.0)
