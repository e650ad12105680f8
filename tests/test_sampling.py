"""Sigma schedule (spec-dit §5.5 and §10 item 1), Euler sampler and guidance."""

import torch

from sgm.diffusion.sampling import cfg_denoiser, guided_velocity, sample
from sgm.diffusion.schedules import shifted_schedule


def test_four_step_schedule_matches_the_release():
    expected = torch.tensor([1.0, 0.954545, 0.875, 0.7, 0.0])
    torch.testing.assert_close(shifted_schedule(4), expected, rtol=0, atol=1e-6)


def test_fifty_step_schedule_rounding_recipe():
    sigmas = shifted_schedule(50)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    spec_values = {0: 1.0, 1: 0.997093, 2: 0.994083, 3: 0.990964, 4: 0.987730, 5: 0.984375, 45: 0.4375}
    spec_values.update({46: 0.378378, 47: 0.308824, 48: 0.225806, 49: 0.125, 50: 0.0})
    for index, value in spec_values.items():
        assert abs(sigmas[index].item() - value) < 1e-6, index
    # Casting s to float32 before 1 - s differs from a float64 evaluation at exactly these indices.
    u = torch.arange(51, dtype=torch.float64) / 50
    naive = (7 * (1 - u) / (1 + 6 * (1 - u))).to(torch.float32)
    assert (naive != sigmas).nonzero().flatten().tolist() == [16, 42, 48]


def test_euler_integrates_a_straight_path_exactly():
    x0 = torch.randn(2, 3)
    noise = torch.randn(2, 3)
    # The exact rectified-flow velocity of a single pair: v = noise - x0 on the straight line.
    out = sample(lambda x, sigma: noise - x0, noise.clone(), shifted_schedule(10), progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_stochastic_sampler_matches_diffusers_flow_match_stochastic_sampling():
    from diffusers import FlowMatchEulerDiscreteScheduler

    def denoise(x, sigma):  # any smooth function of the state and the noise level
        return torch.tanh(x) * (1 + sigma) - 0.3 * x

    sigmas = shifted_schedule(8, 3.0)
    start = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours_noise = torch.Generator().manual_seed(7)
    ours = sample(
        denoise,
        start.clone(),
        sigmas,
        progress=False,
        fresh_noise=lambda: torch.randn(start.shape, generator=ours_noise),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())  # shift 1: our σ as they are, then 0
    torch.testing.assert_close(scheduler.sigmas, sigmas, rtol=0, atol=1e-6)
    theirs, theirs_noise = start.clone(), torch.Generator().manual_seed(7)
    for timestep, sigma in zip(scheduler.timesteps, sigmas[:-1], strict=True):
        theirs = scheduler.step(denoise(theirs, sigma), timestep, theirs, generator=theirs_noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    euler = sample(denoise, start.clone(), sigmas, progress=False)
    assert (ours - euler).abs().max() > 0.1  # the fresh noise matters


def test_cfg_batches_uncond_then_cond_with_the_same_subjects():
    calls = []

    def model(x, timesteps, context, subjects):
        calls.append((x.shape[0], timesteps.clone(), context[:, 0, 0].clone(), subjects))
        return context[:, :1, :1, None, None].expand(x.shape[0], *x.shape[1:]) * 1.0

    cond = torch.full((1, 4, 8), 2.0)
    uncond = torch.full((1, 4, 8), -1.0)
    subjects = torch.randn(1, 2, 3, 4, 4)
    denoise = cfg_denoiser(model, cond, uncond, subjects, scale=6.0)
    v = denoise(torch.zeros(1, 2, 3, 4, 4), torch.tensor(0.25))
    batch, timesteps, contexts, subj = calls[0]
    assert batch == 2 and timesteps.tolist() == [250.0, 250.0]
    assert contexts.tolist() == [-1.0, 2.0]
    assert torch.equal(subj[0], subj[1])
    assert torch.allclose(v, torch.full_like(v, guided_velocity(torch.tensor(-1.0), torch.tensor(2.0), 6.0).item()))
    assert guided_velocity(torch.tensor(-1.0), torch.tensor(2.0), 6.0).item() == 17.0


def test_training_shift_examples_and_rounding_recipe():
    from sgm.diffusion.schedules import resolution_shift, shift_sigmas

    assert abs(resolution_shift(64 * 112 // 4) - 2.138) < 1e-3  # 512x896 video
    assert abs(resolution_shift(90 * 160 // 4) - 2.904) < 1e-3  # 720x1280 video
    assert abs(resolution_shift(32 * 32 // 4) - 1.6487) < 1e-4  # 256 tokens per frame: e^0.5
    sigmas = torch.rand(10000) * 0.999 + 0.0005
    shift = resolution_shift(64 * 112 // 4)
    out = shift_sigmas(sigmas, shift)
    s32 = torch.tensor(shift, dtype=torch.float32)
    recipe = torch.reciprocal((s32 + torch.reciprocal(sigmas)) - 1) * s32  # the release's op order
    assert torch.equal(out, recipe)
    algebraic = shift * sigmas.double() / (shift * sigmas.double() + 1 - sigmas.double())
    torch.testing.assert_close(out.double(), algebraic, rtol=1e-6, atol=1e-7)
    ordered = shift_sigmas(torch.sort(sigmas).values, shift)
    assert torch.all(ordered[1:] >= ordered[:-1]) and torch.all(out > sigmas)  # monotone, moved towards noise
    assert shift_sigmas(torch.tensor([1.0]), shift).item() == 1.0


def test_training_sigmas_take_the_resolution_shift_or_the_configured_one():
    from sgm.diffusion.loss import training_sigmas
    from sgm.diffusion.schedules import resolution_shift

    def expected(shift: float) -> torch.Tensor:  # logit-normal draws of the same seed, shifted in float64
        u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(7))).double()
        return shift * u / (shift * u + 1 - u)

    release = training_sigmas(4096, 36, torch.Generator().manual_seed(7))
    torch.testing.assert_close(release.double(), expected(resolution_shift(36)), rtol=1e-6, atol=1e-7)
    five = training_sigmas(4096, 36, torch.Generator().manual_seed(7), shift=5.0)
    torch.testing.assert_close(five.double(), expected(5.0), rtol=1e-6, atol=1e-7)
    assert five.median() > 0.8 > release.median()  # a larger shift trains more at high noise
