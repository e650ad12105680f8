"""merge_kaleido.py and the converters on fabricated downloads of the real key layout."""

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

import merge_kaleido
from sgm.checkpoint import (
    ENGINE_PREFIX,
    LATEST_FILE,
    SAT_MODEL_FILE,
    find_model_card,
    read_dit_checkpoint,
    read_state_dict,
    resolve_checkpoint,
    write_sat_checkpoint,
)
from sgm.convert.diffusers_wan import diffusers_to_kaleido, kaleido_to_diffusers
from sgm.convert.wan_official import kaleido_to_wan, wan_to_kaleido
from sgm.modules.encoders.text import RELEASE_T5_FILE
from sgm.registry import build_dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return {ENGINE_PREFIX + k: v.clone() for k, v in build_dit("kaleido-tiny").state_dict().items()}


def split(state: dict, parts: int) -> list[dict]:
    keys = sorted(state)
    return [{k: state[k] for k in keys[i::parts]} for i in range(parts)]


def add_components(folder: Path) -> None:
    shutil.copy(ROOT / "assets/kaleido-tiny/Wan2.1_VAE.pth", folder / "Wan2.1_VAE.pth")
    shutil.copytree(ROOT / "assets/kaleido-tiny/umt5", folder / "umt5-xxl")


def make_download(folder: Path, state: dict, kind: str) -> Path:
    folder.mkdir(parents=True)
    shards = split(state, 3)
    if kind == "safetensors_index":
        weight_map = {}
        for n, shard in enumerate(shards):
            name = f"diffusion-{n}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name))
            weight_map.update(dict.fromkeys(shard, name))
        (folder / "diffusion.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif kind == "bin_shards":
        for n, shard in enumerate(shards):
            torch.save(shard, folder / f"pytorch_model-{n}.bin")
    elif kind == "byte_parts":
        whole = folder / "mp_rank_00_model_states.pt"
        torch.save({"module": state, "iteration": 1}, whole)
        data = whole.read_bytes()
        whole.unlink()
        size = len(data) // 3 + 1
        for n, suffix in enumerate(["part_aa", "part_ab", "part_ac"]):
            (folder / f"mp_rank_00_model_states.pt.{suffix}").write_bytes(data[n * size : (n + 1) * size])
        import hashlib

        (folder / "mp_rank_00_model_states.pt.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    add_components(folder)
    return folder


def merge(download: Path, out: Path, *extra: str) -> int:
    return merge_kaleido.main(
        ["--checkpoint_dir", str(download), "--output_dir", str(out), "--model", "kaleido-tiny", *extra]
    )


@pytest.mark.parametrize("kind", ["safetensors_index", "bin_shards", "byte_parts"])
def test_every_download_format_merges_to_the_source(tmp_path, source, kind, caplog):
    download = make_download(tmp_path / "download", source, kind)
    out = tmp_path / "merged"
    assert merge(download, out) == 0
    merged = read_dit_checkpoint(out / "model")
    expected = {k[len(ENGINE_PREFIX) :]: v for k, v in source.items()}
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in expected)
    model = build_dit("kaleido-tiny", device="meta")
    from sgm.checkpoint import load_dit_state_dict

    load_dit_state_dict(model, merged, assign=True)  # strict
    assert (out / "Wan2.1_VAE.pth").is_file() and (out / "umt5-xxl" / RELEASE_T5_FILE).is_file()
    assert (out / "model" / "latest").read_text().strip() == "1"
    assert not list(out.glob(".merge-tmp-*"))
    from sgm.pipeline import SamplingConfig, resolve_components

    components = resolve_components(SamplingConfig(load=str(out / "model")))  # no model, VAE or T5 given
    assert components.name == "kaleido-tiny" and components.arch.num_layers == 4
    assert (
        Path(components.vae_path) == out / "Wan2.1_VAE.pth" and Path(components.text_encoder_path) == out / "umt5-xxl"
    )
    assert merge(download, out) == 0 and "already a finished merge" in caplog.text  # idempotent


def test_pt_format_and_verify_only(tmp_path, source):
    download = make_download(tmp_path / "download", source, "safetensors_index")
    assert merge_kaleido.main(["--checkpoint_dir", str(download), "--verify-only", "--model", "kaleido-tiny"]) == 0
    out = tmp_path / "merged"
    assert merge(download, out, "--format", "pt") == 0
    file = out / "model" / "1" / "mp_rank_00_model_states.pt"
    loaded = torch.load(file, weights_only=True)
    assert set(loaded) == {"module"} and torch.equal(loaded["module"][next(iter(source))], source[next(iter(source))])


def test_mismatching_architecture_lists_keys_and_writes_nothing(tmp_path, source, caplog):
    broken = dict(source)
    del broken[ENGINE_PREFIX + "mixins.final_layer.linear.bias"]
    broken[ENGINE_PREFIX + "transformer.layers.0.extra.weight"] = torch.zeros(2)
    broken[ENGINE_PREFIX + "time_embed.0.bias"] = torch.zeros(7)
    download = make_download(tmp_path / "download", broken, "bin_shards")
    out = tmp_path / "merged"
    assert merge(download, out) == 1
    for name in ("mixins.final_layer.linear.bias", "transformer.layers.0.extra.weight", "time_embed.0.bias: [7]"):
        assert name in caplog.text
    assert not out.exists()  # not even an empty folder


@pytest.mark.parametrize("problem", ["truncated", "missing_shard", "duplicate", "dtype", "pickle", "sha256"])
def test_bad_downloads_are_clear_errors(tmp_path, source, problem, caplog):
    kind = "byte_parts" if problem == "sha256" else "safetensors_index"
    download = make_download(tmp_path / "download", source, kind)
    if problem == "truncated":
        path = download / "diffusion-1.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        expected = "diffusion-1.safetensors: truncated"
    elif problem == "missing_shard":
        (download / "diffusion-2.safetensors").unlink()
        expected = "lists shard diffusion-2.safetensors, which is not in the download"
    elif problem == "duplicate":
        first = next(iter(split(source, 3)[0]))
        save_file({first: source[first].contiguous()}, str(download / "extra.safetensors"))
        expected = f"{first[len(ENGINE_PREFIX) :]} is in two shards"
    elif problem == "dtype":
        shard = split(source, 3)[2]
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in shard.items()}, str(download / "diffusion-2.safetensors")
        )
        expected = "diffusion-2.safetensors: tensor"
    elif problem == "pickle":
        (download / "evil.bin").write_bytes(evil_pickle(tmp_path))
        expected = "evil.bin: cannot be read as a weights-only state dict"
    else:
        (download / "mp_rank_00_model_states.pt.sha256").write_text("0" * 64 + "\n")
        expected = "sha256 of the joined parts differs"
    assert merge(download, tmp_path / "merged") == 1
    assert expected in caplog.text
    assert not (tmp_path / "pwned").exists()


def evil_pickle(tmp_path: Path) -> bytes:
    """A torch file whose unpickling would run code (create a file)."""
    import io
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buffer = io.BytesIO()
    torch.save({"weight": Evil()}, buffer)
    return buffer.getvalue()


def test_pickled_code_is_refused_by_every_loader(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(evil_pickle(tmp_path))
    with pytest.raises(ValueError, match="evil.pt: the file contains code \\(.*\\) and was refused") as info:
        read_state_dict(path)
    assert "weights_only" not in str(info.value) and "False" not in str(info.value)  # no advice to disable it
    assert not (tmp_path / "pwned").exists()


def test_a_file_that_is_no_checkpoint_is_named_so_and_a_latest_pointer_reads_as_its_folder(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("1500\n")
    with pytest.raises(ValueError, match="notes.pt: not a checkpoint") as info:
        read_state_dict(notes)
    assert "contains code" not in str(info.value)
    run = tmp_path / "run"
    weights = {ENGINE_PREFIX + "w": torch.arange(3.0)}
    write_sat_checkpoint(run, weights, None, iteration="7")
    assert (run / LATEST_FILE).read_text().strip() == "7"
    assert resolve_checkpoint(run / LATEST_FILE) == resolve_checkpoint(run) == run / "7" / SAT_MODEL_FILE
    assert torch.equal(read_dit_checkpoint(run / LATEST_FILE)["w"], torch.arange(3.0))


def test_wan_official_and_diffusers_round_trips(source):
    kaleido = {k[len(ENGINE_PREFIX) :]: v for k, v in source.items()}
    wan = kaleido_to_wan(kaleido)
    assert "blocks.0.self_attn.q.weight" in wan and "head.modulation" in wan and "blocks.3.modulation" in wan
    assert all(torch.equal(wan_to_kaleido(wan)[k], kaleido[k]) for k in kaleido)
    assert set(wan_to_kaleido({"model.diffusion_model." + k: v for k, v in wan.items()})) == set(kaleido)
    diffusers = kaleido_to_diffusers(wan_to_kaleido(wan))
    back = diffusers_to_kaleido(diffusers)
    assert set(back) == set(kaleido) and all(
        torch.equal(back[k], kaleido[k]) and back[k].dtype == kaleido[k].dtype for k in kaleido
    )


def test_converter_cli_round_trip_and_diffusers_export_runs(tmp_path, source):
    kaleido = {k[len(ENGINE_PREFIX) :]: v for k, v in source.items()}
    wan_dir = tmp_path / "wan"
    wan_dir.mkdir()
    wan = kaleido_to_wan(kaleido)
    for n, shard in enumerate(split(wan, 2)):
        save_file(
            {k: v.contiguous() for k, v in shard.items()}, str(wan_dir / f"diffusion_pytorch_model-{n}.safetensors")
        )
    run = [sys.executable, "tools/convert.py"]
    for args in (
        ["wan2kaleido", "--input", str(wan_dir), "--output", str(tmp_path / "sat")],
        ["kaleido2diffusers", "--input", str(tmp_path / "sat"), "--output", str(tmp_path / "diff")],
        ["kaleido2safetensors", "--input", str(tmp_path / "sat"), "--output", str(tmp_path / "k.safetensors")],
        ["diffusers2kaleido", "--input", str(tmp_path / "diff"), "--output", str(tmp_path / "back")],
    ):
        result = subprocess.run([*run, *args, "--model", "kaleido-tiny"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    # one iteration's folder of a training run: the model file is read, the optimizer's never is
    torch.save({"scaler": Fraction(1, 2)}, tmp_path / "sat" / "1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    one = ["kaleido2safetensors", "--input", str(tmp_path / "sat" / "1"), "--output", str(tmp_path / "i.safetensors")]
    result = subprocess.run([*run, *one, "--model", "kaleido-tiny"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for path in (tmp_path / "sat", tmp_path / "back", tmp_path / "k.safetensors", tmp_path / "i.safetensors"):
        loaded = read_dit_checkpoint(path)
        assert all(torch.equal(loaded[k], kaleido[k]) for k in kaleido) and set(loaded) == set(kaleido)
        card, _ = find_model_card(path)
        assert card["name"] == "kaleido-tiny" and card["architecture"]["hidden_size"] == 128
    config = json.loads((tmp_path / "diff" / "config.json").read_text())
    # from_pretrained would need `accelerate` for this class; the same files, loaded by hand:
    twin = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    from safetensors.torch import load_file

    twin.load_state_dict(load_file(str(tmp_path / "diff" / "diffusion_pytorch_model.safetensors")), strict=True)
    assert config["num_layers"] == 4
    model = build_dit("kaleido-tiny", init=False).eval()
    model.load_state_dict(kaleido)
    x, t, ctx = torch.randn(1, 2, 16, 8, 8), torch.tensor([500.0]), torch.randn(1, 9, 64)
    with torch.no_grad():
        ours = model(x, t, ctx)
        theirs = twin(x.transpose(1, 2), t, ctx).sample.transpose(1, 2)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    bad = subprocess.run(
        [*run, "wan2kaleido", "--input", str(wan_dir), "--output", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )  # default --model kaleido-14b: shapes differ
    assert bad.returncode == 1 and "do not match kaleido-14b" in bad.stderr


def test_a_finished_merge_is_only_kept_for_the_same_download_and_format(tmp_path, source, caplog):
    first = make_download(tmp_path / "first", source, "safetensors_index")
    out = tmp_path / "merged"
    assert merge(first, out) == 0
    caplog.clear()
    assert merge(first, out) == 0 and "nothing to do" in caplog.text
    changed = {k: v + 1 for k, v in source.items()}  # another download of the same architecture
    second = make_download(tmp_path / "second", changed, "safetensors_index")
    caplog.clear()
    assert merge(second, out) == 0 and "merging again" in caplog.text
    key = next(iter(source))[len(ENGINE_PREFIX) :]
    assert torch.equal(read_dit_checkpoint(out / "model")[key], changed[ENGINE_PREFIX + key])
    caplog.clear()
    assert merge(second, out, "--format", "pt") == 0 and "merging again" in caplog.text  # safetensors -> pt
    assert (out / "model" / "1" / "mp_rank_00_model_states.pt").is_file()
    assert not list((out / "model" / "1").glob("*.safetensors"))


def test_verify_only_writes_nothing_and_a_failed_merge_leaves_no_folder(tmp_path, source, caplog):
    download = make_download(tmp_path / "download", source, "byte_parts")  # parts are joined on the way
    before = sorted(str(p) for p in download.rglob("*"))
    assert merge_kaleido.main(["--checkpoint_dir", str(download), "--verify-only", "--model", "kaleido-tiny"]) == 0
    assert sorted(str(p) for p in download.rglob("*")) == before
    out = tmp_path / "not_made"
    assert merge(download, out, "--model", "kaleido-1.3b") == 1  # shapes differ: nothing written
    assert not out.exists() and "these tensors are exactly kaleido-tiny: merge with --model kaleido-tiny" in caplog.text
    bad_index = make_download(tmp_path / "bad_index", source, "safetensors_index")
    next(bad_index.glob("*.index.json")).write_text("{not json")
    assert merge(bad_index, tmp_path / "x") == 1
    assert "index.json: not a valid index JSON" in caplog.text and not (tmp_path / "x").exists()
