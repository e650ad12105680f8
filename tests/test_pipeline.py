"""The library layer: model cards resolved without weights, and the one-way layering of imports."""

import ast
from pathlib import Path

import pytest
import torch

from sgm.checkpoint import write_model_card
from sgm.pipeline import SamplingConfig, resolve_components
from sgm.registry import ARCHITECTURES, DType, ModelConfig, architecture_card, resolve_arch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"sample_video", "train_video_concat", "merge_kaleido"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_run_one_way():
    """scripts and tools -> sgm -> sat: sat imports no sgm, and no library module, tool or benchmark
    imports a script (tests may call a script's main)."""
    for path in (ROOT / "sat").rglob("*.py"):
        assert not {m for m in imported_modules(path) if m.split(".")[0] == "sgm"}, path
    for folder in ("sat", "sgm", "tools", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not imported_modules(path) & SCRIPTS, path


def card_folder(tmp_path: Path, name: str = "kaleido-tiny", dtype: str = "bfloat16") -> Path:
    folder = tmp_path / "run"
    vae = ROOT / "assets/kaleido-tiny/Wan2.1_VAE.pth"
    card = architecture_card(name, resolve_arch(name, {"num_layers": 2}), dtype, vae=str(vae), text_encoder="../t5")
    write_model_card(folder, card)
    return folder


def test_the_card_gives_architecture_dtype_and_components(tmp_path):
    folder = card_folder(tmp_path)
    components = resolve_components(SamplingConfig(load=str(folder)))
    assert components.name == "kaleido-tiny" and components.arch.num_layers == 2
    assert components.dtype == torch.bfloat16  # the weights' dtype, unless the config says otherwise
    assert Path(components.text_encoder_path) == tmp_path / "t5"  # relative to the card's folder
    assert (components.geometry.temporal_stride, components.geometry.spatial_stride) == (4, 8)
    explicit = SamplingConfig(
        load=str(folder / "1" / "mp_rank_00_model_states.pt"), model=ModelConfig(dtype=DType.float32)
    )
    assert resolve_components(explicit).dtype == torch.float32  # an iteration's file finds its run's card


def test_a_config_that_contradicts_the_card_names_both_values(tmp_path):
    folder = card_folder(tmp_path)
    with pytest.raises(ValueError, match="model.name: the config says 'kaleido-14b'.*says 'kaleido-tiny'"):
        resolve_components(SamplingConfig(load=str(folder), model=ModelConfig(name="kaleido-14b")))
    config = SamplingConfig(load=str(folder))
    config.model.arch.num_layers = 4
    with pytest.raises(ValueError, match="model.arch.num_layers: the config says 4, .* says 2"):
        resolve_components(config)
    config.model.arch.num_layers = 2  # agreeing values are fine
    assert resolve_components(config).arch == resolve_arch("kaleido-tiny", {"num_layers": 2})


def test_without_a_card_the_registry_decides(tmp_path):
    config = SamplingConfig()
    config.vae.path, config.text_encoder.path = str(ROOT / "assets/kaleido-tiny/Wan2.1_VAE.pth"), "x"
    components = resolve_components(config)
    assert components.arch == ARCHITECTURES["kaleido-tiny"] and components.dtype == torch.float32
    with pytest.raises(ValueError, match="vae.path: no VAE given"):
        resolve_components(SamplingConfig(text_encoder=config.text_encoder))


def test_weights_without_a_card_need_a_model_name(tmp_path):
    config = SamplingConfig(load=str(tmp_path / "old_checkpoint.pt"))
    config.vae.path, config.text_encoder.path = str(ROOT / "assets/kaleido-tiny/Wan2.1_VAE.pth"), "x"
    with pytest.raises(ValueError, match="load: .*old_checkpoint.pt: checkpoint not found"):
        resolve_components(config)
    (tmp_path / "old_checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="model.name: .*old_checkpoint.pt has no kaleido_model.json"):
        resolve_components(config)
    config.model.name = "kaleido-tiny"
    assert resolve_components(config).arch == ARCHITECTURES["kaleido-tiny"]
