"""LoRA files in the published layouts, merged and as adapters, against a hand-written merge."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import sample_video
from sgm.diffusion.schedules import shifted_schedule
from sgm.lora import apply_loras, load_lora, parse_lora
from sgm.registry import build_dit, resolve_arch

ROOT = Path(__file__).resolve().parents[1]
D, FFN, R = 128, 512, 4  # kaleido-tiny's width and FFN; the rank of the fabricated LoRAs


def factors(seed: int, out: int, inp: int = D, rank: int = R) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1  # down, up


# layout -> {file key stem: (our parameter, rows, out, in, alpha or None)}, written by hand from the
# layouts' naming (Wan self_attn.q/k/v = rows 0/1/2 of query_key_value, cross_attn.k/v = rows 0/1 of
# key_value; diffusers attn1 = self-attention, attn2 = cross-attention, ffn.net.0.proj / net.2).
LAYOUTS = {
    "wan": (
        ".lora_down.weight",
        ".lora_up.weight",
        {
            "diffusion_model.blocks.1.self_attn.q": (
                "transformer.layers.1.attention.query_key_value.weight",
                (0, D),
                D,
                D,
                8.0,
            ),
            "diffusion_model.blocks.2.cross_attn.v": (
                "transformer.layers.2.cross_attention.key_value.weight",
                (D, 2 * D),
                D,
                D,
                2.0,
            ),
            "diffusion_model.blocks.0.ffn.0": ("transformer.layers.0.mlp.dense_h_to_4h.weight", (0, FFN), FFN, D, None),
        },
    ),
    "kohya": (
        ".lora_down.weight",
        ".lora_up.weight",
        {
            "lora_unet_blocks_0_self_attn_v": (
                "transformer.layers.0.attention.query_key_value.weight",
                (2 * D, 3 * D),
                D,
                D,
                4.0,
            ),
            "lora_unet_blocks_3_cross_attn_o": ("transformer.layers.3.cross_attention.dense.weight", (0, D), D, D, 1.0),
        },
    ),
    "diffusers": (
        ".lora_A.weight",
        ".lora_B.weight",
        {
            "transformer.blocks.1.attn1.to_k": (
                "transformer.layers.1.attention.query_key_value.weight",
                (D, 2 * D),
                D,
                D,
                None,
            ),
            "transformer.blocks.2.attn2.to_q": (
                "transformer.layers.2.cross_attention.query.weight",
                (0, D),
                D,
                D,
                None,
            ),
            "transformer.blocks.0.ffn.net.2": ("transformer.layers.0.mlp.dense_4h_to_h.weight", (0, D), D, FFN, None),
        },
    ),
    "ours": (
        ".lora_A.weight",
        ".lora_B.weight",
        {
            "transformer.layers.2.attention.query_key_value": (
                "transformer.layers.2.attention.query_key_value.weight",
                (0, 3 * D),
                3 * D,
                D,
                None,
            ),
        },
    ),
}


def fabricate(layout: str) -> tuple[dict[str, torch.Tensor], list[tuple[str, tuple[int, int], torch.Tensor]]]:
    """A LoRA state dict of ``layout`` and the expected (parameter, rows, delta) by hand."""
    down_suffix, up_suffix, modules = LAYOUTS[layout]
    state, expected = {}, []
    for n, (stem, (target, rows, out, inp, alpha)) in enumerate(modules.items()):
        down, up = factors(n + 10 * len(layout), out, inp)
        state[stem + down_suffix], state[stem + up_suffix] = down, up
        if alpha is not None:
            state[stem + ".alpha"] = torch.tensor(alpha)
        expected.append((target, rows, (alpha or R) / R * (up @ down)))
    return state, expected


@pytest.fixture()
def dit():
    torch.manual_seed(0)
    return build_dit("kaleido-tiny")


def params(model):
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_merges_like_the_hand_written_reference_and_unmerges_exactly(dit, layout):
    state, expected = fabricate(layout)
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    reference = {k: v.clone() for k, v in original.items()}
    for target, (start, end), delta in expected:
        reference[target][start:end] += 0.5 * delta
    applied = apply_loras(dit, parse_lora(state, params(dit), 4, scale=0.5), "merge")
    merged = dit.state_dict()
    for key in original:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-6, msg=key)
    changed = {target for target, _, _ in expected}
    assert {k for k in original if not torch.equal(merged[k], original[k])} == changed
    applied.remove()
    assert all(torch.equal(dit.state_dict()[k], original[k]) for k in original)


def test_full_differences_for_biases_and_bare_parameters(dit):
    bias, k_bias, norm = torch.randn(D), torch.randn(D), torch.randn(D)
    offsets = torch.randn(1, 6, D)
    state = {
        "diffusion_model.blocks.3.self_attn.o.diff_b": bias,
        "diffusion_model.blocks.2.self_attn.k.diff_b": k_bias,  # rows D:2D of the fused QKV bias
        "diffusion_model.blocks.1.cross_attn.norm_k.diff": norm,
        "diffusion_model.blocks.1.cross_attn.norm_k.alpha": torch.tensor(3.0),  # ignored for differences
        "diffusion_model.blocks.0.modulation.diff": offsets,
    }
    expected = {k: v.clone() for k, v in dit.state_dict().items()}
    expected["transformer.layers.3.attention.dense.bias"] += bias
    expected["transformer.layers.2.attention.query_key_value.bias"][D : 2 * D] += k_bias
    expected["mixins.adaln_layer.cross_key_layernorm_list.1.weight"] += norm
    expected["mixins.adaln_layer.adaLN_modulations.0"] += offsets
    apply_loras(dit, parse_lora(state, params(dit), 4), "merge")
    for key, value in expected.items():
        torch.testing.assert_close(dit.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_adapters_equal_the_merge_switch_off_and_remove_exactly(dit):
    state, _ = fabricate("wan")
    deltas = parse_lora(state, params(dit), 4)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 2, 16, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 5, 64, generator=g)
    subjects = torch.randn(1, 1, 16, 8, 8, generator=g)
    with torch.no_grad():
        base = dit(x, t, ctx, subjects)
        merged = apply_loras(dit, deltas, "merge")
        with_merge = dit(x, t, ctx, subjects)
        merged.remove()
        adapters = apply_loras(dit, deltas, "adapter")
        with_adapters = dit(x, t, ctx, subjects)
        adapters.set_scale(0.0)
        switched_off = dit(x, t, ctx, subjects)
        adapters.remove()
        after = dit(x, t, ctx, subjects)
    assert (with_merge - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(with_adapters, with_merge, rtol=1e-5, atol=1e-5)
    assert torch.equal(switched_off, base) and torch.equal(after, base)
    assert "parametrizations" not in " ".join(dit.state_dict())


def test_keys_that_map_to_nothing_are_listed(dit):
    state, _ = fabricate("wan")
    state["diffusion_model.blocks.0.self_attn.zz.lora_down.weight"] = torch.zeros(R, D)
    state["diffusion_model.blocks.0.self_attn.zz.lora_up.weight"] = torch.zeros(D, R)
    state["text_encoder.layer.0.lora_A.weight"] = torch.zeros(R, D)
    state["stray_tensor"] = torch.zeros(1)
    with pytest.raises(ValueError, match="4 key\\(s\\) map to no parameter") as info:
        parse_lora(state, params(dit), 4, source="bad.safetensors")
    for key in ("self_attn.zz.lora_down.weight", "text_encoder.layer.0.lora_A.weight", "stray_tensor"):
        assert key in str(info.value)
    down, up = factors(0, D)
    with pytest.raises(ValueError, match="does not fit rows"):
        stem = "lora_unet_blocks_0_ffn_0"  # ffn.0 has 512 rows, the up factor 128
        parse_lora({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, params(dit), 4)


def test_four_step_preset_is_the_published_distillation_schedule():
    """lightx2v's step-distilled Wan2.1: timesteps 1000, 750, 500, 250, shift 5, no CFG: the shifted
    sigmas shift·t/(1 + (shift − 1)·t) at t = 1, 0.75, 0.5, 0.25, then 0, by Euler steps."""
    preset = yaml.safe_load((ROOT / "configs/sampling/distill_4step.yaml").read_text())
    assert (preset["num_steps"], preset["shift"], preset["guidance_scale"]) == (4, 5.0, 1.0)
    by_hand = [5 * t / (1 + 4 * t) for t in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert shifted_schedule(4, 5.0).tolist() == pytest.approx(by_hand, abs=1e-6)


def test_sampling_with_loras_and_one_evaluation_per_step_at_guidance_one(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    dit = build_dit(resolve_arch("kaleido-tiny", {"num_layers": 2}), device="meta")
    wan, _ = fabricate("wan")
    wan = {k: v for k, v in wan.items() if ".blocks.1." in k or ".blocks.0." in k}
    save_file(wan, str(tmp_path / "wan.safetensors"))
    kohya, _ = fabricate("kohya")
    save_file({k: v for k, v in kohya.items() if "blocks_0" in k}, str(tmp_path / "kohya.safetensors"))
    assert load_lora(tmp_path / "wan.safetensors", dit)  # the files fit the 2-layer model
    base = ["--config", "configs/model/kaleido_tiny.yaml", "configs/sampling/tiny.yaml", "model.arch.num_layers=2"]
    base += ["num_steps=3", "only_save_latents=true", "--prompt", "a ball", "--ref", "assets/examples/red_ball.png"]
    loras = {
        "lora": [
            {"path": str(tmp_path / "wan.safetensors"), "scale": 2.0},
            {"path": str(tmp_path / "kohya.safetensors")},
        ]
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(loras))
    runs = {}
    for name, extra in {
        "plain": [],
        "merge": [str(tmp_path / "lora.yaml")],
        "adapter": [str(tmp_path / "lora.yaml"), "lora_mode=adapter"],
    }.items():
        argv = [*base[:3], *extra[:1], *base[3:4], *extra[1:], f"output_dir={tmp_path / name}", *base[4:]]
        assert sample_video.main(argv) == 0
        item = next((tmp_path / name).iterdir())
        runs[name] = load_file(str(item / "latents.safetensors"))["latents"]
    assert (runs["merge"] - runs["plain"]).abs().max() > 1e-3
    torch.testing.assert_close(runs["adapter"], runs["merge"], rtol=1e-4, atol=1e-4)
    meta = json.loads((item / "meta.json").read_text())
    assert "wan.safetensors" in meta["config"] and "lora_mode: adapter" in meta["config"]

    from sat.config import load_config
    from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings

    config = load_config(SamplingConfig, base[1:3], ["model.arch.num_layers=2", "guidance_scale=1.0"])
    pipe = KaleidoPipeline.from_config(config, device="cpu")
    batches = []
    forward = pipe.dit.forward
    pipe.dit.forward = lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k)
    timings = Timings()
    pipe.generate_latents("a", steps=4, timings=timings)
    assert timings.network_calls == 4 and batches == [1, 1, 1, 1]  # no unconditional half
    with pytest.raises(SystemExit):
        sample_video.main([*base[:4], "lora_mode=fused", f"output_dir={tmp_path / 'x'}", *base[4:]])


# ---------------------------------------------------------------------------------------------
# Training


def test_trainable_parameters_follow_the_formula_and_the_base_is_frozen(dit):
    from sgm.lora import LoraTrainConfig, add_trainable_lora

    names = add_trainable_lora(dit, LoraTrainConfig(rank=4))
    trainable = {n: p.numel() for n, p in dit.named_parameters() if p.requires_grad}
    # per layer r·(in + out) summed over QKV (D, 3D), dense (D, D), cross Q (D, D), KV (D, 2D),
    # dense (D, D), FFN in (D, F) and out (F, D): r·(15·D + 2·F)
    assert sum(trainable.values()) == 4 * 4 * (15 * D + 2 * FFN) == 47_104
    assert len(names) == 4 * 7 and all("lora_" in n for n in trainable)
    only_mlp = build_dit("kaleido-tiny", device="meta")
    add_trainable_lora(only_mlp, LoraTrainConfig(rank=2, targets=["mlp"]))
    assert sum(p.numel() for p in only_mlp.parameters() if p.requires_grad) == 4 * 2 * 2 * (D + FFN)
    with pytest.raises(ValueError, match="lora.targets"):
        add_trainable_lora(build_dit("kaleido-tiny", device="meta"), LoraTrainConfig(rank=2, targets=["attn"]))


def test_our_lora_file_round_trips_the_training_adapters(dit):
    """The trained parametrization and the file it exports, merged into a fresh copy, agree."""
    from sgm.lora import LoraTrainConfig, add_trainable_lora, trainable_lora_state_dict

    fresh = build_dit("kaleido-tiny", init=False)
    fresh.load_state_dict(dit.state_dict())
    add_trainable_lora(dit, LoraTrainConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)  # B starts at zero; give the adapters something to say
    exported = trainable_lora_state_dict(dit)
    assert set(exported) == {
        f"{m}.{leaf}"
        for m in set(k.rsplit(".", 2)[0] for k in exported if k.endswith("lora_A.weight"))
        for leaf in ("lora_A.weight", "lora_B.weight", "alpha")
    }
    apply_loras(fresh, parse_lora(exported, params(fresh), 4), "merge")
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(1, 2, 16, 8, 8, generator=g), torch.tensor([300.0]), torch.randn(1, 5, 64, generator=g)
    dit.eval()
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, ctx), fresh(x, t, ctx), rtol=1e-5, atol=1e-5)


LORA_TRAIN = [
    "train_video_concat.py",
    "--config",
    "configs/training/tiny.yaml",  # no model YAML: the demo model's card names the architecture
    "load=assets/kaleido-shapes/dit.safetensors",
    "vae.path=assets/kaleido-shapes/vae",
    "text_encoder.path=assets/kaleido-shapes/umt5",
    "text_encoder.max_length=32",
    "lora.rank=4",
    "optimizer.lr=1e-2",
    "schedule.warmup_fraction=0",  # a learning rate that does not depend on train_iters: stop and resume
]


def train(*args: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, *LORA_TRAIN, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(save: Path) -> list[float]:
    import csv

    with open(save / "train_log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_lora_training_learns_resumes_exactly_and_changes_the_demo_model(tmp_path, monkeypatch):
    from sgm.checkpoint import read_state_dict
    from tools.make_toy_videos import make_video_dataset

    data = make_video_dataset(tmp_path / "data", count=4)
    train(f"data.root={data}", f"save={tmp_path / 'whole'}", "train_iters=24", "save_interval=12")
    values = losses(tmp_path / "whole")
    assert len(values) == 24 and sum(values[-6:]) / 6 < 0.8 * sum(values[:6]) / 6  # the loss falls
    info = json.loads((tmp_path / "whole" / "lora.json").read_text())
    demo_name = json.loads((ROOT / "assets/kaleido-shapes/kaleido_model.json").read_text())["name"]
    assert (info["rank"], info["alpha"], info["base"]["name"]) == (4, 4.0, demo_name)
    module = read_state_dict(tmp_path / "whole" / "24" / "mp_rank_00_model_states.pt")
    assert module and all("lora_" in key for key in module)  # adapters only, not the frozen base
    lora_file = tmp_path / "whole" / "24" / "lora.safetensors"
    assert len(load_file(str(lora_file))) == 3 * 28
    assert json.loads((lora_file.parent / "lora.json").read_text()) == info  # each checkpoint is self-contained

    train(f"data.root={data}", f"save={tmp_path / 'split'}", "train_iters=12", "save_interval=12")
    train(f"data.root={data}", f"save={tmp_path / 'split'}", "train_iters=24", "save_interval=12")
    split = losses(tmp_path / "split")
    assert len(split) == 24 and max(abs(a - b) for a, b in zip(values, split, strict=True)) <= 1e-6

    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/sampling/shapes.yaml", "only_save_latents=true", "num_steps=4"]
    common += [
        "--prompt",
        "the first object moves left",
        "--ref",
        "assets/kaleido-shapes/examples/heldout_00009_ref1.png",
    ]
    assert sample_video.main([*common[:4], f"output_dir={tmp_path / 'plain'}", *common[4:]]) == 0
    with_lora = [*common[:4], f"lora=[{{path: {lora_file}}}]", f"output_dir={tmp_path / 'lora'}", *common[4:]]
    assert sample_video.main(with_lora) == 0
    plain, adapted = (
        load_file(str(next((tmp_path / n).iterdir()) / "latents.safetensors"))["latents"] for n in ("plain", "lora")
    )
    assert (plain - adapted).abs().max() > 0.1 * plain.abs().mean()  # the LoRA changes the demo model's output
    with pytest.raises(SystemExit):  # the run's folder is adapters, not a DiT: one clear error
        sample_video.main([*common[:4], f"load={tmp_path / 'whole'}", f"output_dir={tmp_path / 'x'}", *common[4:]])


def test_lora_training_settings_are_checked_first(tmp_path):
    import subprocess
    import sys

    for extra, message in (("zero_stage=3", "zero_stage 1 or 2"), ("lora.targets=[attn]", "lora.targets")):
        argv = [sys.executable, *LORA_TRAIN, f"data.root={tmp_path}", extra]
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-500:]


def test_fp8_base_storage_is_scaled_per_row_and_survives_a_cast(dit):
    from torch.nn.utils import parametrize

    from sgm.lora import FP8, LoraTrainConfig, add_trainable_lora, restore_fp8_storage

    reference = build_dit("kaleido-tiny", init=False)
    reference.load_state_dict(dit.state_dict())
    add_trainable_lora(dit, LoraTrainConfig(rank=4, base_storage="fp8"))
    qkv = dit.transformer.layers[0].attention.query_key_value
    stored = qkv.parametrizations.weight.original
    assert stored.dtype == FP8 and stored.element_size() == 1
    original = reference.transformer.layers[0].attention.query_key_value.weight
    with torch.no_grad():
        error = ((qkv.weight - original).norm() / original.norm()).item()  # B = 0: the dequantised base
        rows = (qkv.weight - original).abs().amax(dim=1) / original.abs().amax(dim=1)
    assert 0 < error < 0.05 and rows.max() <= 2**-4  # e4m3: 3 mantissa bits, each row at full range
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(1, 2, 16, 8, 8, generator=g), torch.tensor([600.0]), torch.randn(1, 5, 64, generator=g)
    with torch.no_grad():
        ours, theirs = dit(x, t, ctx), reference(x, t, ctx)
    assert (ours - theirs).norm() / theirs.norm() < 0.02
    before = stored.detach().float().clone()
    dit.float()  # what DeepSpeed's precision setup does to every floating parameter
    assert qkv.parametrizations.weight.original.dtype == torch.float32
    assert restore_fp8_storage(dit) == 4 * 7
    assert qkv.parametrizations.weight.original.dtype == FP8
    assert torch.equal(qkv.parametrizations.weight.original.float(), before)  # lossless round trip
    assert parametrize.is_parametrized(qkv, "weight")


@pytest.mark.slow
def test_lora_training_on_an_fp8_base_follows_the_full_precision_base(tmp_path):
    from tools.make_toy_videos import make_video_dataset

    data = make_video_dataset(tmp_path / "data", count=2)
    train(f"data.root={data}", f"save={tmp_path / 'fp8'}", "train_iters=2", "lora.base_storage=fp8")
    train(f"data.root={data}", f"save={tmp_path / 'full'}", "train_iters=2")
    fp8, full = losses(tmp_path / "fp8"), losses(tmp_path / "full")
    assert all(abs(a - b) < 0.02 * b for a, b in zip(fp8, full, strict=True)) and fp8 != full


def test_dry_run_prints_the_lora_memory_of_the_14b():
    import subprocess
    import sys

    argv = [sys.executable, "train_video_concat.py", "--config", "configs/model/kaleido_14b.yaml"]
    argv += ["configs/training/kaleido_14b_concat.yaml", "--dry-run", "lora.rank=64", "lora.targets=[attention,mlp]"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    D14, F14 = 5120, 13824  # per layer r·((D + 3D) + (D + D) + (D + F) + (F + D)) for attention and MLP
    assert f"{40 * 64 * (8 * D14 + 2 * F14):,} trainable of 14,288,491,584 parameters" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 | bf16", "| 8 | fp8"))]
    assert len(rows) == 2 and rows[0].split("|")[3].strip() == "26.6"  # the bf16 base: 2 B x 14.3 B parameters
