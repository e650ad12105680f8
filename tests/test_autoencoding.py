"""FSQ quantizer and the one-centred gradient penalty (spec-vae §5)."""

import itertools

import torch

from sgm.modules.autoencoding.fsq import FSQ
from sgm.modules.autoencoding.losses import gradient_penalty


def test_every_index_maps_to_its_code_and_back():
    fsq = FSQ([8, 5, 3])
    assert fsq.codebook_size == 120
    indices = torch.arange(120)
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (120, 3)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    grids = [sorted({round(v * (L // 2)) for v in codes[:, j].tolist()}) for j, L in enumerate([8, 5, 3])]
    assert grids == [list(range(-4, 4)), list(range(-2, 3)), [-1, 0, 1]]
    # mixed radix, first dimension least significant
    assert [list(map(round, (c * torch.tensor([4, 2, 1])).tolist())) for c in codes[:2]] == [[-4, -2, -1], [-3, -2, -1]]
    assert len({tuple(c.tolist()) for c in codes}) == 120


def test_outputs_lie_on_the_grid_and_indices_agree():
    fsq = FSQ([7, 6, 4, 2])
    z = torch.randn(5, 11, 4) * 3
    out, indices = fsq(z)
    half = torch.tensor([3, 3, 2, 1])
    assert torch.allclose(out * half, (out * half).round(), atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(fsq.indices_to_codes(indices), out)
    levels = [range(-3, 4), range(-3, 3), range(-2, 2), range(-1, 1)]
    allowed = {tuple(v / h for v, h in zip(c, [3, 3, 2, 1], strict=True)) for c in itertools.product(*levels)}
    assert all(
        tuple(round(x, 6) for x in row.tolist()) in {tuple(round(a, 6) for a in t) for t in allowed}
        for row in out.view(-1, 4)
    )


def test_straight_through_gradients_and_channel_first_layout():
    fsq = FSQ([5, 5, 5, 5], dim=6, num_codebooks=2)
    z = torch.randn(2, 6, 3, 4, requires_grad=True)  # [B, C, H, W]
    out, indices = fsq(z)
    assert out.shape == z.shape and indices.shape == (2, 3, 4, 2)
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # the rounding itself passes gradients unchanged: d round_ste(x)/dx = 1
    x = torch.linspace(-3, 3, 13, requires_grad=True)
    from sgm.modules.autoencoding.fsq import round_ste

    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(13)) and torch.equal(round_ste(x.detach()), x.detach().round())


def test_gradient_penalty_of_a_linear_discriminator():
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # D(x) = Σ (x ⊙ W): gradient W for every sample
    inputs = torch.randn(5, 2, 2, requires_grad=True)
    logits = (inputs * weight).sum(dim=(1, 2))
    penalty = gradient_penalty(inputs, logits)
    expected = (torch.tensor(26.0).sqrt() - 1) ** 2  # ‖W‖₂ = √(9 + 16 + 0 + 1)
    torch.testing.assert_close(penalty, expected)
    scale = torch.tensor(1.0, requires_grad=True)
    gradient_penalty(inputs, (inputs * weight * scale).sum(dim=(1, 2))).backward()
    # d/ds (s·√26 − 1)² at s = 1 = 2(√26 − 1)√26
    torch.testing.assert_close(scale.grad, 2 * (torch.tensor(26.0).sqrt() - 1) * torch.tensor(26.0).sqrt())
