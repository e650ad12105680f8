"""Faster and better sampling: reference guidance, CFG-parallel, step caching, compile; each option
switched off is the plain sampler."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sat.config import load_config
from sat.parallel import check_layout, free_port
from sgm.data.references import load_reference
from sgm.diffusion.sampling import cfg_denoiser, guided_denoiser, reference_guided_velocity
from sgm.diffusion.schedules import shifted_schedule
from sgm.diffusion.step_cache import psnr
from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings, check_guidance, evaluations_per_step
from tests.helpers import demo_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = [str(ROOT / "configs/sampling/shapes.yaml")]
REF = ROOT / "assets/kaleido-shapes/examples/heldout_00009_ref1.png"


def demo(*overrides: str) -> KaleidoPipeline:
    return KaleidoPipeline.from_config(demo_config("num_steps=8", *overrides), device="cpu")


@pytest.fixture(scope="module")
def plain():
    pipe = demo()
    timings = Timings()
    latents = pipe.generate_latents(
        "the first object bounces", references=[load_reference(str(REF))], seed=4, timings=timings
    )
    return pipe, latents, timings


def toy_model(x, timesteps, context, subjects):
    """A velocity that tells its inputs apart: text value + 10 with references, per batch element."""
    with_refs = 0.0 if subjects is None else 10.0
    return torch.ones_like(x) * (context[:, :1, :1, None, None] + with_refs)


def recording_toy():
    """A latent, prompt and negative texts, reference latents, and ``toy_model`` recording each call's
    ``(batch, with references?)`` in ``calls``."""
    calls = []

    def model(x, t, c, s):
        calls.append((x.shape[0], s is not None))
        return toy_model(x, t, c, s)

    text, negative = torch.full((1, 5, 8), 2.0), torch.full((1, 5, 8), -1.0)
    return torch.zeros(1, 2, 3, 4, 4), text, negative, torch.zeros(1, 1, 3, 4, 4), calls, model


def test_reference_guidance_guides_text_and_references_apart():
    x, text, negative, subjects, calls, model = recording_toy()
    v = guided_denoiser(model, text, negative, subjects, 5.0, reference_scale=3.0)(x, torch.tensor(0.5))
    # v_∅ = -1 (negative, no references), v_u = 9 (negative + references), v_c = 12 (text + references)
    assert torch.all(v == -1 + 3.0 * (9 - -1) + 5.0 * (12 - 9))
    assert calls == [(2, True), (1, False)]  # 3 evaluations: the two with references in one call
    assert (
        reference_guided_velocity(
            torch.tensor(-1.0), torch.tensor(9.0), torch.tensor(12.0), scale=5.0, reference_scale=1.0
        )
        == 9 + 5.0 * 3
    )
    # off: the release's two-evaluation CFG, the very same closure
    off = guided_denoiser(model, text, negative, subjects, 5.0)
    assert off.__qualname__ == cfg_denoiser(model, text, negative, subjects, 5.0).__qualname__
    assert torch.all(off(x, torch.tensor(0.5)) == 9 + 5.0 * (12 - 9))


def test_reference_guidance_interval_limits_the_third_evaluation_to_its_noise_levels():
    x, text, negative, subjects, calls, model = recording_toy()
    denoise = guided_denoiser(model, text, negative, subjects, 5.0, reference_scale=3.0, reference_interval=(0.2, 0.5))
    cfg, guided = 9 + 5.0 * (12 - 9), -1 + 3.0 * (9 - -1) + 5.0 * (12 - 9)
    for sigma, expected, step_calls in [
        (0.9, cfg, [(2, True)]),  # above the interval: plain CFG, one batched call
        (0.5, guided, [(2, True), (1, False)]),  # the bounds are inside
        (0.35, guided, [(2, True), (1, False)]),
        (0.2, guided, [(2, True), (1, False)]),
        (0.1, cfg, [(2, True)]),
    ]:
        calls.clear()
        assert torch.all(denoise(x, torch.tensor(sigma)) == expected), sigma
        assert calls == step_calls, sigma


def test_reference_guidance_interval_shortens_sampling_and_is_validated(plain, monkeypatch):
    pipe, _, _ = plain
    refs = [load_reference(str(REF))]
    full, limited = Timings(), Timings()
    every = pipe.generate_latents("the first object bounces", references=refs, seed=4, timings=full)
    interval = demo("reference_guidance_scale=2.0", "reference_guidance_interval=[0.0,1.0]")
    same = interval.generate_latents("the first object bounces", references=refs, seed=4)
    guided = demo("reference_guidance_scale=2.0").generate_latents("the first object bounces", references=refs, seed=4)
    assert torch.equal(same, guided)  # an interval holding every σ of the schedule is plain reference guidance
    late = demo("reference_guidance_scale=2.0", "reference_guidance_interval=[0.0,0.5]")
    late_latents = late.generate_latents("the first object bounces", references=refs, seed=4, timings=limited)
    sigmas = shifted_schedule(8, late.settings.shift)[:-1]
    inside = int((sigmas <= 0.5).sum())
    assert 0 < inside < 8 and limited.network_calls == full.network_calls + inside
    assert not torch.equal(late_latents, guided) and not torch.equal(late_latents, every)

    def config(*overrides):
        return load_config(SamplingConfig, DEMO, list(overrides))

    with pytest.raises(ValueError, match="set reference_guidance_scale too"):
        check_guidance(config("reference_guidance_interval=[0.0,0.5]"))
    for bad in ("[0.5,0.2]", "[-0.1,0.5]", "[0.5]"):
        with pytest.raises(ValueError, match="expected \\[low, high\\] noise levels"):
            check_guidance(config("reference_guidance_scale=2.0", f"reference_guidance_interval={bad}"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="unequally often"):
        check_guidance(
            config(
                "reference_guidance_scale=2.0",
                "reference_guidance_interval=[0.0,0.5]",
                "cfg_parallel_size=3",
                "sequence_parallel_size=1",
                "fsdp=true",
            )
        )


def test_options_switched_off_are_plain_and_reference_scale_one_is_cfg(plain):
    pipe, latents, timings = plain
    refs = [load_reference(str(REF))]
    assert timings.network_calls == 8  # one batched [uncond, cond] call per step
    off = demo("reference_guidance_scale=null", "cfg_parallel_size=1", "cache.method=none", "compile=false")
    assert torch.equal(off.generate_latents("the first object bounces", references=refs, seed=4), latents)
    t = Timings()
    one = pipe.generate_latents(
        "the first object bounces", references=refs, seed=4, reference_guidance_scale=1.0, timings=t
    )
    assert t.network_calls == 16  # the third evaluation is a call of its own (no references: fewer tokens)
    torch.testing.assert_close(one, latents, rtol=0, atol=1e-4)  # v_∅ + 1·(v_u − v_∅) = v_u up to rounding
    two = pipe.generate_latents("the first object bounces", references=refs, seed=4, reference_guidance_scale=2.0)
    assert (two - latents).abs().max() > 1e-2  # it does something


def test_step_cache_skips_evaluations_and_threshold_zero_is_exact(plain):
    pipe, latents, _ = plain
    refs = [load_reference(str(REF))]
    exact = demo("cache.method=first_block", "cache.threshold=0")
    assert torch.equal(exact.generate_latents("the first object bounces", references=refs, seed=4), latents)
    assert exact.step_cache.full_evaluations == 8
    loose = demo("cache.method=first_block", "cache.threshold=10")  # every step after the first reuses
    t = Timings()
    cached = loose.generate_latents("the first object bounces", references=refs, seed=4, timings=t)
    assert t.network_calls == 8 and loose.step_cache.full_evaluations == 1
    assert not torch.equal(cached, latents) and psnr(cached, latents) > 5
    loose.generate_latents("the first object bounces", references=refs, seed=5, segments=2, overlap=1)
    assert loose.step_cache.full_evaluations == 1 + 2  # the cache starts afresh for every video and segment
    loose.step_cache.remove()
    assert torch.equal(loose.generate_latents("the first object bounces", references=refs, seed=4), latents)
    assert all(not layer.keep_input for layer in loose.dit.transformer.layers)


def test_compiled_blocks_match_plain(plain):
    pipe, latents, _ = plain
    compiled = demo("compile=true", "num_steps=2")
    refs = [load_reference(str(REF))]
    eager = demo("num_steps=2").generate_latents("a", references=refs, seed=1)
    torch.testing.assert_close(compiled.generate_latents("a", references=refs, seed=1), eager, rtol=1e-4, atol=1e-4)


def test_guidance_layouts_are_validated_before_loading(monkeypatch):
    def config(*overrides):
        return load_config(SamplingConfig, DEMO, list(overrides))

    assert evaluations_per_step(6.0, None) == 2 and evaluations_per_step(1.0, None) == 1
    assert evaluations_per_step(6.0, 2.0) == 3
    with pytest.raises(ValueError, match="cfg_parallel_size: 2 ranks for 1 evaluation"):
        check_guidance(config("cfg_parallel_size=2", "guidance_scale=1"))
    with pytest.raises(ValueError, match="cfg_parallel_size: 3 ranks for 2 evaluation"):
        check_guidance(config("cfg_parallel_size=3"))
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(
        ValueError, match="6 process\\(es\\) do not split into cfg_parallel_size 2 × sequence_parallel_size 2"
    ):
        check_guidance(config("cfg_parallel_size=2", "sequence_parallel_size=2"))
    check_layout(8, sp_size=2, cfg_size=2)  # data 2 × cfg 2 × sp 2
    with pytest.raises(ValueError, match="sequence_parallel_size > 1"):
        from sgm.diffusion.step_cache import StepCacheConfig, check_step_cache

        check_step_cache(StepCacheConfig(method="first_block"), sp_size=2)


def sample(tmp_path, name: str, processes: int, *extra: str) -> torch.Tensor:
    """Latents of one demo item made by ``processes`` processes (gloo)."""
    argv = [
        *DEMO[:0],
        "--config",
        *DEMO,
        "num_steps=4",
        "only_save_latents=true",
        f"output_dir={tmp_path / name}",
        *extra,
    ]
    argv += ["--prompt", "the first object bounces while the second object moves left", "--ref", str(REF), str(REF)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    result = subprocess.run([*launch, "sample_video.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if "fsdp=true" in extra:  # each rank holds half of the weights (up to padding of odd-sized rows)
        held = re.findall(r"fsdp: (\d+) of (\d+) DiT weight bytes held by this rank \(2 ranks\)", result.stderr)
        assert len(held) == 2 and all(abs(int(a) / int(b) - 0.5) < 0.01 for a, b in held), held
    (item,) = (tmp_path / name).iterdir()
    return load_file(item / "latents.safetensors")["latents"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("processes", "extra"),
    [
        (2, ["cfg_parallel_size=2"]),
        (2, ["cfg_parallel_size=2", "reference_guidance_scale=2.0"]),
        (3, ["cfg_parallel_size=3", "reference_guidance_scale=2.0", "reference_guidance_interval=[0.0,0.5]"]),
        (4, ["cfg_parallel_size=2", "sequence_parallel_size=2"]),
        (2, ["cfg_parallel_size=2", "fsdp=true"]),
    ],
    ids=["cfg2", "cfg2-reference-guidance", "cfg3-reference-interval", "cfg2xsp2", "cfg2-fsdp"],
)
def test_cfg_parallel_equals_one_process(tmp_path, processes, extra):
    guidance = [e for e in extra if e.startswith("reference")]
    one = sample(tmp_path, "one", 1, *guidance)
    many = sample(tmp_path, "many", processes, *extra)
    # batch 1 per rank against batch 2 in one process: the same maths, other matmul blockings
    assert (one - many).abs().max() <= 1e-4 * one.abs().max()


def test_start_index_enters_the_schedule_at_the_first_level_at_or_below_the_start():
    from sgm.diffusion.sampling import start_index

    sigmas = shifted_schedule(25, 1.6)
    assert start_index(sigmas, 1.0) == 0 and start_index(sigmas, 0.0) == 25
    for start in (0.95, 0.8, 0.5, 0.1):
        k = start_index(sigmas, start)
        assert sigmas[k] <= start < sigmas[k - 1], start
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="start_sigma"):
            start_index(sigmas, bad)


class ConstantVelocityDiT(torch.nn.Module):
    """Stands in for the DiT: velocity ``c`` everywhere, so that Euler steps have a closed form."""

    def __init__(self, real: torch.nn.Module, c: float):
        super().__init__()
        self.config, self.dtype, self.c = real.config, real.dtype, c

    def forward(self, x, timesteps, context, subjects, token_offset=None):
        return torch.full_like(x, self.c)


def test_sampling_from_a_given_latent_re_noises_it_and_runs_the_rest_of_the_schedule(plain):
    pipe, latents, _ = plain
    refs = [load_reference(str(REF))]
    init = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    run = lambda **kw: pipe.generate_latents("the first object bounces", references=refs, seed=4, **kw)  # noqa: E731
    assert torch.equal(run(init_latents=init, start_sigma=1.0), latents)  # from σ = 1 the given latent is gone
    assert torch.equal(run(init_latents=init, start_sigma=0.0), init)  # at σ = 0 it is the answer

    # A constant velocity c: from x_σ = (1 − σ)·init + σ·ε the Euler steps to 0 end at x_σ − σ·c,
    # with ε the seed's starting noise and σ the first schedule level at or below the start.
    sigmas = shifted_schedule(8, pipe.settings.shift)
    sigma = sigmas[sigmas <= 0.6][0]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    real = pipe.dit
    try:
        pipe.dit = ConstantVelocityDiT(real, c=0.25)
        out = run(init_latents=init, start_sigma=0.6)
    finally:
        pipe.dit = real
    torch.testing.assert_close(out, (1 - sigma) * init + sigma * noise - sigma * 0.25, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="segments=1"):
        run(init_latents=init, start_sigma=0.5, segments=2, overlap=1)
    with pytest.raises(ValueError, match="expected shape"):
        run(init_latents=init[:, :1], start_sigma=0.5)
    with pytest.raises(ValueError, match="needs init_latents"):
        run(start_sigma=0.5)
