"""Memory tiers: every tier samples what the full tier samples; the lowest holds at most its blocks."""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sat.config import load_config
from sgm.data.references import load_reference
from sgm.memory import MemoryConfig, tier_settings
from sgm.pipeline import KaleidoPipeline, SamplingConfig, resolve_components, validate_sampling
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
DEMO = [str(ROOT / "configs/sampling/shapes.yaml")]
REF = ROOT / "assets/kaleido-shapes/examples/heldout_00009_ref1.png"


def demo_config(*overrides: str) -> SamplingConfig:
    return helpers.demo_config("num_steps=3", *overrides)


def sample(pipe: KaleidoPipeline) -> torch.Tensor:
    return pipe.generate_latents("the first object bounces", references=[load_reference(str(REF))], seed=2)


@pytest.fixture(scope="module")
def full():
    return sample(KaleidoPipeline.from_config(demo_config(), device="cpu"))


def test_what_each_tier_moves():
    assert tier_settings(MemoryConfig("full")) == tier_settings(MemoryConfig("full", blocks_resident=2))
    assert tier_settings(MemoryConfig("balanced")).text_encoder == "offload"
    assert tier_settings(MemoryConfig("low")).blocks_resident == 4
    lowest = tier_settings(MemoryConfig("lowest", blocks_resident=3))
    assert (lowest.blocks_resident, lowest.from_disk, lowest.text_encoder, lowest.vae_tiling) == (3, True, "cpu", True)
    with pytest.raises(ValueError, match="memory.tier: expected one of full, balanced, low, lowest"):
        tier_settings(MemoryConfig("tiny"))


@pytest.mark.parametrize("tier", ["balanced", "low", "lowest"])
def test_every_tier_samples_the_full_tiers_latent_exactly(full, tier):
    pipe = KaleidoPipeline.from_config(demo_config(f"memory.tier={tier}"), device="cpu")
    assert torch.equal(sample(pipe), full)  # float32: bit for bit
    if tier != "full":
        assert pipe.conditioner.encoder.placement.value == tier_settings(MemoryConfig(tier)).text_encoder


@pytest.mark.parametrize("resident", [1, 2])
def test_lowest_never_holds_more_blocks_than_its_limit(full, resident):
    pipe = KaleidoPipeline.from_config(
        demo_config("memory.tier=lowest", f"memory.blocks_resident={resident}"), device="cpu"
    )
    layers = pipe.dit.transformer.layers
    seen = []

    def count(module, args):  # counted independently of the streamer: blocks whose weights are real now
        seen.append(sum(not next(layer.parameters()).is_meta for layer in layers))

    # registered after the streamer's hooks: runs once the block about to run has been read
    hooks = [layer.register_forward_pre_hook(count) for layer in layers]
    assert torch.equal(sample(pipe), full)
    assert len(seen) == 3 * len(layers) and max(seen) == resident and min(seen) >= 1
    assert all(next(layer.parameters()).is_meta for layer in layers[: len(layers) - resident + 1])
    assert pipe.streamer.max_resident == resident
    for hook in hooks:
        hook.remove()


def test_lowest_needs_a_safetensors_file_with_every_weight(tmp_path):
    state = load_file(str(ROOT / "assets/kaleido-shapes/dit.safetensors"))
    card = ROOT / "assets/kaleido-shapes/kaleido_model.json"
    (tmp_path / card.name).write_text(card.read_text())  # the architecture, beside the weights
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="streams the DiT's blocks from a .safetensors file"):
        KaleidoPipeline.from_config(demo_config("memory.tier=lowest", f"load={tmp_path / 'dit.pt'}"), device="cpu")
    broken = dict(state)
    broken.pop("transformer.layers.1.mlp.dense_4h_to_h.weight")
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="block 1: mlp.dense_4h_to_h.weight missing or unexpected"):
        KaleidoPipeline.from_config(  # refused at load, from the file's key list, not in the middle of a video
            demo_config("memory.tier=lowest", f"load={tmp_path / 'broken.safetensors'}"), device="cpu"
        )
    config = demo_config("memory.tier=lowest", f"lora=[{{path: {tmp_path / 'broken.safetensors'}}}]")
    with pytest.raises(ValueError, match="memory.tier=lowest moves the DiT's blocks; it does not combine with lora"):
        validate_sampling(config, resolve_components(config))


def test_the_plans_text_encoder_size_is_umt5s(tmp_path):
    from sgm.memory import umt5_encoder_parameters
    from tests.helpers import tiny_umt5

    model = tiny_umt5(vocab_size=300)
    c = model.config
    counted = sum(p.numel() for p in model.parameters())
    assert counted == umt5_encoder_parameters(
        d_model=c.d_model,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        vocab_size=c.vocab_size,
        num_heads=c.num_heads,
        d_kv=c.d_kv,
        buckets=c.relative_attention_num_buckets,
    )


def test_the_plan_sizes_the_text_encoder_the_folder_holds():
    """The committed tiny encoder is a release ``.pth`` without config.json: the plan reads its
    shapes (it assumed umT5-XXL, 21 GiB, and a GPU run measured 5 GiB for a plan of 27), and the
    loaded encoder, once moved, takes exactly the planned bytes: one embedding, not a copy per name."""
    from sgm.modules.encoders.text import build_text_encoder
    from sgm.pipeline import memory_plans

    files = [str(ROOT / "configs/model/kaleido_tiny.yaml"), str(ROOT / "configs/sampling/tiny.yaml")]
    config = load_config(SamplingConfig, files, [])
    components = resolve_components(config)
    planned = {p.tier: p.text_encoder for p in memory_plans(config, components)}
    encoder = build_text_encoder(dataclasses.replace(config.text_encoder, path=components.text_encoder_path), "cpu")
    model = encoder.model.to(torch.float64)  # a move makes new tensors, as .to("cuda") does
    storages = {p.data_ptr(): p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False)}
    assert planned["full"] == sum(storages.values()) / 2 and planned["lowest"] == 0  # planned in float32


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensors created inside the mode and still alive, and their peak (storages that
    existed before, weights and inputs, are not counted; views of them neither)."""

    def __init__(self, existing: list):
        super().__init__()
        tensors = torch.utils._pytree.tree_flatten(existing)[0]
        self.known = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.known or size == 0:
                continue
            self.known.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self.known.discard(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ffn", [512, 4096])  # the attention half is the larger, then the MLP half
def test_the_plans_block_activations_are_what_a_block_holds(dtype, ffn):
    """``block_activation_bytes`` against the tensors one block's inference forward really keeps
    alive (its input plus the peak of what it creates), measured by a dispatch-level tracker; the
    CUDA path's FFN buffer is fresh, so the CPU's reused scratch buffer is switched off."""
    from sgm.memory import block_activation_bytes
    from sgm.registry import build_dit

    arch = {"num_layers": 1, "hidden_size": 512, "num_attention_heads": 8, "inner_hidden_size": ffn, "text_dim": 64}
    dit = build_dit(arch, dtype=dtype).eval()
    layer = dit.transformer.layers[0]
    layer.mlp.scratch = None
    forward, seen = layer.forward, {}

    def tracked(h, *args):
        with LiveTensorBytes([*dit.parameters(), *dit.buffers(), h, *args]) as tracker:
            out = forward(h, *args)
        seen.update(peak=tracker.peak + h.numel() * h.element_size(), batch=h.shape[0], tokens=h.shape[1])
        return out

    layer.forward = tracked
    x = torch.randn(2, 2, 16, 16, 16, dtype=dtype)  # [B, T, C, H, W]: 2 x 8 x 8 video tokens per sample
    with torch.no_grad():
        dit(x, torch.full((2,), 500.0), torch.randn(2, 8, 64, dtype=dtype), torch.randn(2, 1, 16, 16, 16, dtype=dtype))
    planned = block_activation_bytes(
        tokens=seen["tokens"], batch=seen["batch"], hidden=512, ffn=ffn, bytes_per_value=dtype.itemsize
    )
    assert abs(seen["peak"] - planned) <= 0.02 * planned, (seen["peak"], planned)


def test_plan_picks_a_tier_that_fits_the_14b_at_512p(capsys):
    import sample_video

    base = [
        "--config",
        str(ROOT / "configs/model/kaleido_14b.yaml"),
        str(ROOT / "configs/sampling/kaleido_14b_512p.yaml"),
    ]
    peaks = {}
    for vram in (24, 12):
        assert sample_video.main([*base, "--plan", "--vram", str(vram)]) == 0
        out = capsys.readouterr().out
        chosen = out.strip().splitlines()[-1]
        tier, peak = chosen.split("memory.tier=")[1].split(" (planned peak ")
        peaks[vram] = (tier, float(peak.split(" GiB")[0]))
        assert peaks[vram][1] <= vram
        assert "512x896x81, 3 references" in out
    assert peaks[24][0] != "lowest" and peaks[12][1] < peaks[24][1]  # 24 GiB affords a faster tier than 12
    with pytest.raises(SystemExit):
        sample_video.main([*base, "--plan", "--vram", "1"])
    assert "no tier fits 1 GiB" in capsys.readouterr().err


def test_plan_counts_the_dits_weights_and_auto_chooses(tmp_path):
    from sgm.pipeline import choose_tier, memory_plans

    config = demo_config()
    components = resolve_components(config)
    plans = {p.tier: p for p in memory_plans(config, components)}
    dit = KaleidoPipeline.from_config(config, device="cpu").dit
    weight_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    assert plans["full"].dit_resident == weight_bytes
    block = sum(p.numel() * p.element_size() for p in dit.transformer.layers[0].parameters())
    rest = weight_bytes - len(dit.transformer.layers) * block
    assert plans["lowest"].dit_resident == rest + 2 * block  # one block and the one read ahead
    assert plans["low"].dit_resident == rest + 2 * block  # diffusers streams one block per group
    unstreamed = {
        p.tier: p for p in memory_plans(demo_config("memory.prefetch=false", "memory.blocks_resident=3"), components)
    }
    assert unstreamed["low"].dit_resident == unstreamed["lowest"].dit_resident == rest + 3 * block
    assert plans["lowest"].text_encoder == 0 and plans["full"].peak > plans["lowest"].peak
    assert choose_tier(list(plans.values()), 64).tier == "full"
    pipe = KaleidoPipeline.from_config(demo_config("memory.tier=auto", "memory.vram_gib=64"), device="cpu")
    assert pipe.streamer is None  # 64 GiB: the full tier


@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["full", "balanced", "low", "lowest"])
def test_gpu_peak_of_each_tier_is_within_15_percent_of_the_plan(tmp_path, tier):
    """kaleido-1.3b's blocks (random bf16 weights) at 480×832×81 with 3 references: the measured peak
    of ``torch.cuda.max_memory_allocated`` against the plan, and seconds per step (printed)."""
    import time

    from PIL import Image

    from sgm.pipeline import memory_plans
    from sgm.registry import ARCHITECTURES, build_dit

    overrides = [  # kaleido-1.3b reading the committed tiny text encoder's features
        "model.name=kaleido-1.3b",
        f"model.arch.text_dim={ARCHITECTURES['kaleido-tiny'].text_dim}",
        "model.dtype=bfloat16",
        "vae.dtype=bfloat16",
        "sampling_image_size=[480,832]",
        "sampling_num_frames=21",
        "num_steps=2",
        "max_references=3",
        f"memory.tier={tier}",
    ]
    files = [str(ROOT / "configs/model/kaleido_tiny.yaml"), str(ROOT / "configs/sampling/tiny.yaml")]
    config = load_config(SamplingConfig, files, overrides)
    components = resolve_components(config)
    weights = tmp_path / "dit.safetensors"
    save_file(build_dit(components.arch, device="cpu", dtype=torch.bfloat16).state_dict(), str(weights))
    config.load = str(weights)
    plan = {p.tier: p for p in memory_plans(config, resolve_components(config))}[tier]
    pipe = KaleidoPipeline.from_config(config, device="cuda")
    refs = [Image.new("RGB", (64, 64), (200, 40, 40))] * 3
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latents = pipe.generate_latents("a red ball", references=refs, seed=1)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / config.num_steps
    pipe.decode(latents)
    peak = torch.cuda.max_memory_allocated()
    print(f"{tier}: measured {peak / 2**30:.2f} GiB, planned {plan.peak / 2**30:.2f} GiB, {per_step:.2f} s/step")
    assert abs(peak - plan.peak) <= 0.15 * plan.peak


def test_fp8_storage_halves_bf16_and_stays_close(full):
    from sgm.memory import dequantize_fp8, quantize_fp8, resident_weight_bytes

    weight = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitudes
    for scaled in (False, True):
        stored, scale = quantize_fp8(weight, scaled=scaled)
        assert stored.dtype == torch.float8_e4m3fn and (scale is not None) == scaled
        error = (dequantize_fp8(stored, scale, torch.float32) - weight).abs()
        # e4m3 keeps 3 mantissa bits: within 2^-4 relative, each row (scaled) or each value above 2^-6 (plain)
        if scaled:
            assert torch.all(error <= weight.abs().amax(dim=1, keepdim=True) * 2**-4)
        else:
            big = weight.abs() > 2**-6
            assert torch.all(error[big] <= weight.abs()[big] * 2**-4)
    assert quantize_fp8(torch.tensor([[1000.0]]), scaled=False)[0].float().item() == 448.0  # saturates, no NaN

    bf16 = KaleidoPipeline.from_config(demo_config("model.dtype=bfloat16"), device="cpu").dit.transformer.layers
    fp8 = KaleidoPipeline.from_config(demo_config("memory.weights=fp8", "model.dtype=bfloat16"), device="cpu")
    layers = fp8.dit.transformer.layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    assert resident_weight_bytes(bf16) - resident_weight_bytes(layers) == linear  # 2 bytes -> 1 byte each
    for weights in ("fp8", "fp8_scaled"):
        latents = sample(KaleidoPipeline.from_config(demo_config(f"memory.weights={weights}"), device="cpu"))
        relative = ((latents - full).norm() / full.norm()).item()
        assert 0 < relative < 0.15  # measured 0.06 on the demo model at 10 steps (README table)
