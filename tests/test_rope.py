"""3D RoPE: dims, frequencies, token positions (spec-dit §3.1–3.4) and the rotation itself."""

import torch

from sgm.modules.rope import TokenLayout, apply_rope, inverse_frequencies, rope_angles, rope_axis_dims, token_positions


def test_axis_split():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(32) == (12, 10, 10)
    assert rope_axis_dims(16) == (8, 4, 4)
    assert sum(rope_axis_dims(96)) == 96


def test_inverse_frequencies_float32():
    inv = inverse_frequencies(44, 10000.0)
    assert inv.dtype == torch.float32 and inv.shape == (22,)
    expected = torch.tensor([1 / 10000 ** (2 * j / 44) for j in range(22)], dtype=torch.float64)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)


def test_subject_and_video_positions():
    layout = TokenLayout(video_grid=(2, 2, 3), subject_grids=((2, 3), (1, 2)))
    positions = token_positions(layout, subject_origin=(80, 80)).tolist()
    subject0 = [[0, 80 + r, 80 + c] for r in range(2) for c in range(3)]
    subject1 = [[1, 80, 80], [1, 80, 81]]
    video = [[f, r, c] for f in range(2) for r in range(2) for c in range(3)]
    assert positions == subject0 + subject1 + video
    assert layout.num_subject_tokens == 8 and layout.num_video_tokens == 12


def test_sequence_parallel_shift_moves_video_and_subject_origin():
    layout = TokenLayout(video_grid=(1, 1, 2), subject_grids=((1, 2),))
    positions = token_positions(layout, subject_origin=(80, 80), spatial_shift=(4, 0)).tolist()
    assert positions == [[0, 84, 80], [0, 84, 81], [0, 4, 0], [0, 4, 1]]


def test_rotation_equals_complex_multiplication_per_axis():
    head_dim = 32
    layout = TokenLayout(video_grid=(3, 2, 2), subject_grids=((2, 2),))
    positions = token_positions(layout, (80, 80))
    angles = rope_angles(positions, head_dim, 10000.0)
    x = torch.randn(2, positions.shape[0], 3, head_dim)
    out = apply_rope(x, angles.cos(), angles.sin())

    # Reference: Wan's formulation with complex numbers in float64, built axis by axis.
    dims = rope_axis_dims(head_dim)
    freqs = [
        torch.outer(positions[:, axis].double(), 1.0 / 10000 ** (torch.arange(0, d, 2).double() / d))
        for axis, d in enumerate(dims)
    ]
    rotation = torch.polar(torch.ones(positions.shape[0], head_dim // 2, dtype=torch.float64), torch.cat(freqs, 1))
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(xc * rotation[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=5e-5)
    # norms of each pair are preserved
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
