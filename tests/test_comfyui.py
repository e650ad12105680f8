"""ComfyUI's Wan2.1 layout: export (bf16, fp8, scaled fp8) and import (community files included)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sgm.checkpoint import read_dit_checkpoint
from sgm.convert.comfyui import comfyui_to_kaleido, kaleido_to_comfyui
from sgm.registry import build_dit

ROOT = Path(__file__).resolve().parents[1]
DEMO_NAME = json.loads((ROOT / "assets/kaleido-shapes/kaleido_model.json").read_text())["name"]  # its architecture


@pytest.fixture(scope="module")
def kaleido():
    torch.manual_seed(0)
    return {k: v.to(torch.bfloat16) for k, v in build_dit("kaleido-tiny", device="cpu").state_dict().items()}


def test_bf16_export_is_the_wan_layout_under_diffusion_model_and_round_trips(kaleido):
    comfy = kaleido_to_comfyui(kaleido)
    assert all(k.startswith("diffusion_model.") for k in comfy)
    dim = kaleido["transformer.layers.0.attention.query_key_value.weight"].shape[1]
    assert comfy["diffusion_model.blocks.0.self_attn.q.weight"].shape == (dim, dim)
    assert torch.equal(
        comfy["diffusion_model.blocks.0.self_attn.k.weight"],
        kaleido["transformer.layers.0.attention.query_key_value.weight"][dim : 2 * dim],
    )
    assert "diffusion_model.head.head.weight" in comfy and "diffusion_model.blocks.3.modulation" in comfy
    back = comfyui_to_kaleido(comfy)
    assert back.keys() == kaleido.keys() and all(torch.equal(back[k], kaleido[k]) for k in kaleido)
    # the other prefixes ComfyUI files use read the same
    for prefix in ("model.diffusion_model.", ""):
        other = {prefix + k[len("diffusion_model.") :]: v for k, v in comfy.items()}
        assert all(torch.equal(comfyui_to_kaleido(other)[k], kaleido[k]) for k in kaleido)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_scaled"])
def test_fp8_exports_store_block_matrices_in_e4m3_and_read_back_close(kaleido, fmt):
    comfy = kaleido_to_comfyui(kaleido, fmt=fmt)
    q = comfy["diffusion_model.blocks.1.ffn.0.weight"]
    assert q.dtype == torch.float8_e4m3fn
    assert comfy["diffusion_model.blocks.1.norm3.weight"].dtype == torch.bfloat16  # norms stay bf16
    assert comfy["diffusion_model.patch_embedding.weight"].dtype == torch.bfloat16
    assert ("scaled_fp8" in comfy) == (fmt == "fp8_scaled")
    assert ("diffusion_model.blocks.1.ffn.0.scale_weight" in comfy) == (fmt == "fp8_scaled")
    back = comfyui_to_kaleido(comfy)
    for name, original in kaleido.items():
        error = (back[name].float() - original.float()).abs()
        if name.startswith("transformer.layers.") and name.endswith("weight") and original.ndim == 2:
            # e4m3: 3 mantissa bits (half a step: 2^-4 relative) above 2^-6; below, subnormal steps of 2^-9
            # (half: 2^-10), in units of the per-tensor scale when scaled; then bf16 rounding (2^-8)
            unit = original.float().abs().amax() / 448 if fmt == "fp8_scaled" else 1.0
            bound = original.float().abs() * (2**-4 + 2**-8) + unit * 2**-10 * 1.01
            assert torch.all(error <= bound), name
        else:
            assert torch.equal(back[name], original), name


def test_a_community_scaled_fp8_file_imports(kaleido, tmp_path):
    comfy = kaleido_to_comfyui(kaleido, fmt="fp8_scaled")
    community = {k.replace("diffusion_model.", "model.diffusion_model.", 1): v for k, v in comfy.items()}
    name = "model.diffusion_model.blocks.2.cross_attn.o"
    # dequantisation is weight · scale_weight, checked on a hand-made tensor
    community[name + ".weight"] = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    community[name + ".scale_weight"] = torch.tensor([0.25])
    back = comfyui_to_kaleido(community, dtype=torch.float32)
    expected = torch.tensor([[0.25, -0.5], [0.125, 112.0]])
    assert torch.equal(back["transformer.layers.2.cross_attention.dense.weight"], expected)
    orphan = dict(comfy) | {"diffusion_model.blocks.9.ffn.0.scale_weight": torch.tensor([1.0])}
    with pytest.raises(ValueError, match="scale_weight without its weight: blocks.9.ffn.0.weight"):
        comfyui_to_kaleido(orphan)


def test_convert_cli_exports_and_imports_the_demo_model(tmp_path):
    demo = ROOT / "assets/kaleido-shapes/dit.safetensors"
    comfy, back = tmp_path / "comfy.safetensors", tmp_path / "back" / "kaleido.safetensors"
    common = [sys.executable, "tools/convert.py"]
    for argv in (
        ["kaleido2comfyui", "--input", str(demo), "--output", str(comfy), "--model", DEMO_NAME, "--format", "fp8"],
        ["comfyui2kaleido", "--input", str(comfy), "--output", str(back), "--model", DEMO_NAME],
    ):
        result = subprocess.run([*common, *argv], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    exported = load_file(str(comfy))
    size = sum(t.numel() * t.element_size() for t in exported.values())
    original = load_file(str(demo))
    assert size < 0.5 * sum(t.numel() * t.element_size() for t in original.values())  # fp32 -> mostly fp8
    imported = read_dit_checkpoint(back)
    assert imported.keys() == original.keys() and (back.parent / "kaleido_model.json").is_file()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    result = subprocess.run(
        [
            *common,
            "comfyui2kaleido",
            "--input",
            str(tmp_path / "bad.safetensors"),
            "--output",
            str(tmp_path / "o.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr and not (tmp_path / "o.safetensors").exists()


def test_prequantized_files_load_without_widening_and_sample_like_on_the_fly_fp8(tmp_path):
    from sat.config import load_config
    from sgm.data.references import load_reference
    from sgm.memory import Fp8Weight
    from sgm.pipeline import KaleidoPipeline, SamplingConfig

    demo = ROOT / "assets/kaleido-shapes/dit.safetensors"
    common = [sys.executable, "tools/convert.py"]
    ours, comfy, back = (
        tmp_path / "ours" / "dit.safetensors",
        tmp_path / "c.safetensors",
        tmp_path / "back" / "dit.safetensors",
    )
    for argv in (
        ["kaleido2safetensors", "--input", str(demo), "--output", str(ours), "--format", "fp8_scaled"],
        ["kaleido2comfyui", "--input", str(demo), "--output", str(comfy), "--format", "fp8_scaled"],
        ["comfyui2kaleido", "--input", str(comfy), "--output", str(back), "--keep-fp8"],
    ):
        result = subprocess.run([*common, *argv, "--model", DEMO_NAME], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    refs = [load_reference(str(ROOT / "assets/kaleido-shapes/examples/heldout_00009_ref1.png"))]

    def latents(*overrides):
        config = load_config(SamplingConfig, [str(ROOT / "configs/sampling/shapes.yaml")], ["num_steps=4", *overrides])
        for section in (config.text_encoder, config.vae):
            section.path = str(ROOT / section.path)
        config.load = config.load if Path(config.load).is_absolute() else str(ROOT / config.load)
        pipe = KaleidoPipeline.from_config(config, device="cpu")
        return pipe, pipe.generate_latents("the first object bounces", references=refs, seed=3)

    _, on_the_fly = latents("memory.weights=fp8_scaled")
    pipe, prequantized = latents(f"load={ours}")
    linear = pipe.dit.transformer.layers[0].mlp.dense_h_to_4h
    assert linear.parametrizations.weight.original.dtype == torch.float8_e4m3fn  # kept fp8 from the file
    assert isinstance(linear.parametrizations.weight[0], Fp8Weight)
    assert torch.equal(prequantized, on_the_fly)  # the same quantisation, written then read
    _, from_comfy = latents(f"load={back}")
    # ComfyUI's scales are per tensor (ours per row): close to the on-the-fly latent, not equal
    assert ((from_comfy - on_the_fly).norm() / on_the_fly.norm()).item() < 0.1
    assert load_file(str(back))["transformer.layers.0.attention.query_key_value.weight"].dtype == torch.float8_e4m3fn
