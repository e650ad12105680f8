"""Training: data, learning-rate schedule, weight decay, DeepSpeed runs, resume, SP, checkpoints."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sat.parallel import free_port
from sat.training import ScheduleConfig, estimate_memory, lr_factor, parameter_groups, prune_checkpoints
from sgm.data.video import BadDataError, DataConfig, VideoDataset, next_usable_batch, select_frames
from sgm.registry import build_dit
from sgm.training import EMA_FILE, WeightAverage
from tools.make_toy_videos import make_video_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train_video_concat.py", "--config", "configs/model/kaleido_tiny.yaml", "configs/training/tiny.yaml"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_video_dataset(tmp_path_factory.mktemp("data"), count=4)


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launch += ["--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*launch, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(save: Path) -> list[float]:
    with open(save / "train_log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_release_learning_rate_warmup():
    release = ScheduleConfig(style="constant", warmup_fraction=0.01, release_warmup=True)
    factors = [lr_factor(n, 5000, release) for n in (1, 2, 3, 50, 100, 101, 4000)]
    assert factors == pytest.approx([0.02, 0.04, 0.05, 0.05, 0.05, 1.0, 1.0])
    cosine = ScheduleConfig(style="cosine", warmup_fraction=0.1, release_warmup=False, min_lr_fraction=0.1)
    assert lr_factor(5, 100, cosine) == pytest.approx(0.5)
    assert lr_factor(10, 100, cosine) == pytest.approx(1.0)
    assert lr_factor(100, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(55, 100, cosine) == pytest.approx(0.1 + 0.9 * 0.5)


def test_weight_decay_spares_biases_and_norms():
    model = build_dit({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "inner_hidden_size": 64})
    decay, no_decay = parameter_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert "transformer.layers.0.attention.query_key_value.weight" in decayed
    assert "mixins.adaln_layer.adaLN_modulations.0" in decayed
    assert "transformer.layers.0.attention.query_key_value.bias" in spared
    assert "transformer.layers.0.post_cross_attention_layernorm.weight" in spared
    assert "mixins.adaln_layer.query_layernorm_list.0.weight" in spared
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_frame_selection_rule():
    assert select_frames(100, 16, 16, 9, frames_multiple=4) == list(range(3, 12))  # skip 3, native fps
    assert select_frames(100, 32, 16, 5, frames_multiple=4) == [3, 5, 7, 9, 11]  # resample 32 -> 16 fps
    assert select_frames(30, 32, 8, 9, frames_multiple=4) == [
        3,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        26,
    ]  # too short for 8 fps: stride over all
    assert select_frames(7, 16, 16, 9, frames_multiple=4) == [
        0,
        1,
        2,
        3,
        4,
        4,
        4,
        4,
        4,
    ]  # 5 = largest 4k+1, padded with the last


def test_dataset_batches_order_sharding_and_bad_samples(dataset, tmp_path, caplog):
    config = DataConfig(root=str(dataset), height=32, width=48, num_frames=5, fps=8, max_references=3)
    batch = next(iter(VideoDataset(config, batch_size=1, frames_multiple=4)))
    assert batch["mp4"].shape == (1, 5, 3, 32, 48) and batch["mp4"].dtype == torch.float32
    assert batch["mp4"].min() >= -1 and batch["mp4"].max() <= 1
    assert batch["subject_images"].shape[2:] == (3, 32, 48) and batch["txt"][0].startswith("the object moves right")
    assert batch["fps"].tolist() == [8] and batch["num_frames"].tolist() == [5]
    ranks = [VideoDataset(config, rank=r, world_size=2, frames_multiple=4).order(0) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(f"clip{i:03d}" for i in range(4)) and not set(ranks[0]) & set(ranks[1])
    assert (
        VideoDataset(config, frames_multiple=4).order(3)
        == VideoDataset(config, frames_multiple=4).order(3)
        != VideoDataset(config, frames_multiple=4).order(4)
    )

    broken = make_video_dataset(tmp_path / "broken", count=3)
    (broken / "videos" / "clip000.mp4").write_bytes(b"not a video")
    for ref in (broken / "references" / "clip001").iterdir():
        ref.unlink()
    config = DataConfig(root=str(broken), height=32, width=32, num_frames=5, fps=8)
    batches = [b for _, b in zip(range(3), VideoDataset(config, batch_size=1, frames_multiple=4), strict=False)]
    assert sum(b["skipped"] for b in batches) == 2 and sum(b["size"] for b in batches) == 1
    assert "clip000" in caplog.text and "cannot decode" in caplog.text and "no reference images" in caplog.text


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, *TRAIN, f"data.root={tmp_path / 'nothing'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "has no videos/ folder" in result.stderr
    with pytest.raises(FileNotFoundError, match="holds no .mp4"):
        (tmp_path / "videos").mkdir()
        VideoDataset(DataConfig(root=str(tmp_path)), frames_multiple=4)


def test_checkpoint_pruning(tmp_path):
    for name in ("10", "20", "30", "latest_dummy"):
        (tmp_path / name).mkdir()
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["10"] and sorted(p.name for p in tmp_path.iterdir())[:2] == ["20", "30"]


def test_dry_run_prints_memory_table():
    result = subprocess.run(
        [
            sys.executable,
            "train_video_concat.py",
            "--config",
            "configs/model/kaleido_14b.yaml",
            "configs/training/kaleido_14b_concat.yaml",
            "--dry-run",
            "--world-size",
            "8",
            "64",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "14,288,491,584 parameters" in result.stdout and "| 64 | 3 |" in result.stdout
    m = estimate_memory(14_288_491_584, 40, 5120, 13824, 1000, 8, 1, 2)
    assert m.weights == 2 * 14_288_491_584 and m.optimizer == 12 * 14_288_491_584 / 8


@pytest.mark.distributed
def test_two_process_training_lowers_the_loss_and_samples(dataset, tmp_path):
    save = tmp_path / "run"
    torchrun(*TRAIN, f"data.root={dataset}", "train_iters=24", "save_interval=12", f"save={save}")
    values = losses(save)
    assert len(values) == 24
    assert sum(values[-6:]) / 6 < 0.8 * sum(values[:6]) / 6
    assert (save / "latest").read_text().strip() == "24" and (save / "24" / "mp_rank_00_model_states.pt").is_file()
    assert "train_iters: 24" in (save / "config.yaml").read_text()  # the resolved config next to the weights
    assert not list(save.glob("zero_to_*.py"))  # DeepSpeed's unpickling recovery scripts are removed
    import sample_video

    out = tmp_path / "samples"
    card = json.loads((save / "kaleido_model.json").read_text())  # the architecture travels with the weights
    assert card["name"] == "kaleido-tiny" and card["architecture"]["num_layers"] == 4
    argv = [
        "--config",
        "configs/sampling/tiny.yaml",  # no model YAML: the card says what to build
        f"load={save}",
        f"output_dir={out}",
        "num_steps=2",
        "--prompt",
        "the object moves right",
        "--ref",
        str(dataset / "references" / "clip000" / "ref1.png"),
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert sample_video.main(argv) == 0
    finally:
        os.chdir(cwd)
    assert (next(out.iterdir()) / "output.mp4").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_gives_the_uninterrupted_losses(dataset, tmp_path, stage):
    common = [*TRAIN, f"data.root={dataset}", f"zero_stage={stage}"]
    common += ["ema_decay=0.9"] if stage == 2 else []  # the weight average resumes exactly too (ZeRO-1/2 only)
    torchrun(*common, "train_iters=6", "save_interval=100", f"save={tmp_path / 'whole'}")
    torchrun(*common, "train_iters=3", "save_interval=3", f"save={tmp_path / 'split'}")
    torchrun(*common, "train_iters=6", "save_interval=3", f"save={tmp_path / 'split'}")
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(whole) == len(split) == 6
    assert max(abs(a - b) for a, b in zip(whole, split, strict=True)) <= 1e-6
    if stage == 2:
        from safetensors.torch import load_file

        from sgm.checkpoint import load_dit_state_dict, read_dit_checkpoint

        averages = [load_file(tmp_path / run / "6" / EMA_FILE) for run in ("whole", "split")]
        assert max((averages[0][k] - averages[1][k]).abs().max().item() for k in averages[0]) <= 1e-6
        raw = read_dit_checkpoint(tmp_path / "whole")
        gap = max((averages[0][k].float() - raw[k].float()).abs().max().item() for k in raw)
        assert gap > 1e-4  # an average of the run's weights, not the last ones
        dit = build_dit("kaleido-tiny")
        load_dit_state_dict(dit, averages[0])  # loads where the DiT's weights load (load=<folder>/ema.safetensors)
        assert torch.equal(dit.state_dict()[next(iter(raw))], averages[0][next(iter(raw))])
    else:
        assert not (tmp_path / "whole" / "6" / EMA_FILE).exists()


def test_weight_average_is_the_decayed_mean_of_the_iterates(tmp_path):
    """LitEma's rule (spec-vae-t5-data §6) in closed form: iterate n weighs (1 − d_n)·Π_{k>n} d_k with
    d_n = min(decay, (1 + n) / (10 + n)); the starting weights weigh Π d_k. Saved and loaded exactly."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    module.register_buffer("scale", torch.tensor([2.0]))
    decay, steps = 0.5, 9
    average = WeightAverage(module, decay)
    iterates = [module.weight.detach().double().clone()]
    for _ in range(steps):
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight))
        iterates.append(module.weight.detach().double().clone())
        average.update()
    rates = [min(decay, (1 + n) / (10 + n)) for n in range(1, steps + 1)]
    shares = [math.prod(rates)] + [(1 - rates[n - 1]) * math.prod(rates[n:]) for n in range(1, steps + 1)]
    assert abs(sum(shares) - 1) < 1e-12 and rates[-1] == decay  # the warm-up has ended within the run
    expected = sum(share * iterate for share, iterate in zip(shares, iterates, strict=True))
    torch.testing.assert_close(average.state_dict()["weight"].double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(average.state_dict()["scale"], module.scale)  # buffers as they are
    average.save(tmp_path / EMA_FILE)
    again = WeightAverage(module, decay)
    again.load(tmp_path / EMA_FILE)
    assert again.updates == steps
    assert all(torch.equal(again.average[k], average.average[k]) for k in average.average)
    assert [p.name for p in tmp_path.iterdir()] == [EMA_FILE]  # written through a temporary name


@pytest.mark.distributed
@pytest.mark.parametrize("split", ["height", "width"])
def test_sequence_parallel_loss_and_gradients_equal_one_process(split):
    result = torchrun("tests/sp_gradient_check.py", split)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["dim"] == (3 if split == "height" else 4)
    assert report["loss"] <= 1e-5 and report["grad"] <= 1e-5


def test_batches_group_samples_with_equal_reference_counts(tmp_path):
    root = make_video_dataset(tmp_path / "mixed", count=7)  # odd clips have 2 references, even ones 1
    config = DataConfig(root=str(root), height=32, width=32, num_frames=5, fps=8)
    dataset = VideoDataset(config, batch_size=2, frames_multiple=4)
    batches = dataset.chunks(0)
    assert sorted(i for b in batches for i in b) == sorted(dataset.ids)
    assert all(len({dataset.reference_count(i) for i in b}) == 1 for b in batches)
    first = next(iter(dataset))
    assert first["mp4"].shape[0] == first["subject_images"].shape[0] == len(batches[0])


def test_precomputed_latents_train_like_videos(tmp_path):
    root = make_video_dataset(tmp_path / "data", count=3)
    base = [sys.executable, *TRAIN, f"data.root={root}", "train_iters=2"]
    tool = [
        sys.executable,
        "tools/precompute_latents.py",
        "--config",
        "configs/model/kaleido_tiny.yaml",
        "configs/training/tiny.yaml",
        f"data.root={root}",
    ]
    for cmd in (
        [*tool, "--shard", "0/2"],  # two shards cover the set: samples 0, 2 and 1
        [*tool, "--shard", "1/2"],
        [*base, f"save={tmp_path / 'videos'}"],
        [*base, f"save={tmp_path / 'latents'}", "data.latents=true"],
        [*base, f"save={tmp_path / 'videos-weighted'}", "subject_loss_weight=10"],
        [*base, f"save={tmp_path / 'latents-weighted'}", "data.latents=true", "subject_loss_weight=10"],
    ):
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (root / "latents").iterdir()) == [f"clip00{i}.safetensors" for i in range(3)]
    assert losses(tmp_path / "videos") == losses(tmp_path / "latents")  # the same numbers, without the VAE
    # the stored subject masks are the ones found in the videos: the weighted losses agree too
    assert losses(tmp_path / "videos-weighted") == losses(tmp_path / "latents-weighted")
    assert losses(tmp_path / "videos-weighted") != losses(tmp_path / "videos")
    bad = subprocess.run([*tool, "--shard", "2/2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--shard must be K/N" in bad.stderr

    # a rerun keeps a file only when its inputs are proven the same: VAE, data settings, sample files
    def rerun(*extra: str) -> str:
        result = subprocess.run([*tool, *extra], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    def stamps() -> dict:
        return {p.name: p.stat().st_mtime_ns for p in (root / "latents").iterdir()}

    before = stamps()
    assert "0 written (0 of them replacing latents of other inputs), 3 already there" in rerun()
    assert stamps() == before
    reference = next((root / "references" / "clip001").iterdir())
    reference.write_bytes(reference.read_bytes() + b"\0")  # same image, other bytes: its digest changes
    assert "1 written (1 of them replacing latents of other inputs), 2 already there" in rerun()
    after = stamps()
    assert after["clip001.safetensors"] != before["clip001.safetensors"]
    assert {k: v for k, v in after.items() if k != "clip001.safetensors"} == {
        k: v for k, v in before.items() if k != "clip001.safetensors"
    }
    assert "3 written (3 of them replacing" in rerun("data.fps=4")  # another data setting: all again


class _Payload:
    """Unpickling this runs ``os.system`` (what a planted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_planted_pickle(dataset, tmp_path):
    save = tmp_path / "run"
    base = [sys.executable, *TRAIN, f"data.root={dataset}", f"save={save}", "save_interval=2"]
    first = subprocess.run([*base, "train_iters=2"], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    marker = tmp_path / "pwned"
    optimizer_file = next((save / "2").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": {}, "payload": _Payload(marker)}, optimizer_file)  # a planted shard
    complete = json.loads((save / "2" / "complete.json").read_text())  # a careful attacker fixes the sizes too
    complete["files"][optimizer_file.name] = optimizer_file.stat().st_size
    (save / "2" / "complete.json").write_text(json.dumps(complete))
    resumed = subprocess.run([*base, "train_iters=4"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 2 and "refusing to resume" in resumed.stderr and "posix.system" in resumed.stderr
    assert "weights_only" not in resumed.stderr  # no advice to switch the protection off
    assert not marker.exists()
    assert (save / "latest").read_text().strip() == "2"


def test_a_dataset_of_only_bad_samples_stops_with_one_error(tmp_path):
    broken = make_video_dataset(tmp_path / "broken", count=2)
    for video in (broken / "videos").iterdir():
        video.write_bytes(b"not a video")
    config = DataConfig(root=str(broken), height=32, width=32, num_frames=5, fps=8)
    dataset = VideoDataset(config, frames_multiple=4)
    with pytest.raises(
        BadDataError, match="no usable sample in 2 batch.*first reasons: .*clip00.\\.mp4: cannot decode"
    ):
        next_usable_batch(iter(dataset), len(dataset.chunks(0)))
    good = VideoDataset(
        DataConfig(root=str(make_video_dataset(tmp_path / "good", count=2)), height=32, width=32, num_frames=5, fps=8),
        frames_multiple=4,
    )
    batch, skipped = next_usable_batch(iter(good), 2)
    assert batch["size"] == 1 and skipped == []
    result = subprocess.run(
        [sys.executable, *TRAIN, f"data.root={broken}", f"save={tmp_path / 'run'}", "train_iters=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "every sample is bad" in result.stderr and "cannot decode" in result.stderr
    assert "Traceback" not in result.stderr
    for sample_id in ("clip000", "clip001"):  # warned once each, though every epoch meets them again
        warnings = [line for line in result.stderr.splitlines() if "skipping sample" in line and sample_id in line]
        assert len(warnings) == 1, warnings


def test_checkpoint_pruning_reports_a_folder_it_cannot_remove(tmp_path, monkeypatch, caplog):
    import shutil

    for name in ("10", "20", "30"):
        (tmp_path / name).mkdir()
    real = shutil.rmtree

    def stuck(path, *args, **kwargs):
        if Path(path).name == "10":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stuck)
    removed = prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["20"] and (tmp_path / "10").is_dir()
    assert "could not remove old checkpoint" in caplog.text and "10" in caplog.text


def test_training_values_are_checked_before_anything_starts(dataset, capsys, monkeypatch):
    """Each bad value exits 2 with one line naming the key, before any process group or model exists.
    The first case runs the script as a user does (no traceback); the others call its ``main`` in
    this process, which reaches the same check without paying a Python start-up each."""
    import train_video_concat

    monkeypatch.chdir(ROOT)  # the configs' relative paths, as for the script
    for n, (extra, message) in enumerate(
        (
            ("save_interval=0", "save_interval: expected at least 1"),
            ("log_interval=0", "log_interval: expected at least 1"),
            ("gradient_accumulation=0", "gradient_accumulation: expected at least 1"),
            ("micro_batch_size=0", "micro_batch_size: expected at least 1"),
            ("train_iters=-1", "train_iters: expected at least 1"),
            ("data.height=60", "data.height, data.width: expected height a multiple of 16"),
            ("device=gpu", "device: expected auto, cpu or cuda"),
            ("training_shift=0", "training_shift: expected a number > 0"),
            ("ema_decay=1", "ema_decay: expected a number between 0 and 1"),
            ("ema_decay=0.99 zero_stage=3", "ema_decay: the weight average is kept for full training"),
            ("alignment.layer=5", "alignment.layer: expected 0 (off) to 4"),
            ("alignment.layer=2 alignment.weight=0", "alignment.weight: expected a number > 0"),
            ("alignment.layer=2 zero_stage=3", "alignment.layer: the alignment loss trains a full DiT"),
            ("alignment.layer=2", "holds no target files (tools/make_token_targets.py"),
        )
    ):
        args = [*TRAIN[1:], f"data.root={dataset}", *extra.split()]
        if n == 0:
            result = subprocess.run([sys.executable, TRAIN[0], *args], cwd=ROOT, capture_output=True, text=True)
            code, stderr = result.returncode, result.stderr
            assert "Traceback" not in stderr
        else:
            with pytest.raises(SystemExit) as exit_info:
                train_video_concat.main(args)
            code, stderr = exit_info.value.code, capsys.readouterr().err
            assert stderr.strip().count("\n") == 0, stderr
        assert code == 2 and message in stderr, (extra, stderr[-500:])


def torchrun_raw(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*launch, *args], cwd=ROOT, env=full_env, capture_output=True, text=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_run_killed_anywhere_in_a_save_resumes_to_the_uninterrupted_losses(dataset, tmp_path):
    """Rank 0 or 1 dies before the save, after its shards (another rank's shard cut short), after
    complete.json, after latest, and after latest with a shard damaged since: each rerun resumes
    from the newest complete checkpoint and ends with the uninterrupted run's losses, each once."""
    common = [*TRAIN, f"data.root={dataset}", "train_iters=6", "save_interval=2"]
    torchrun(*common, f"save={tmp_path / 'whole'}")
    whole = losses(tmp_path / "whole")
    cases = [("before", 0, None), ("shards", 1, "1"), ("complete", 0, None), ("latest", 0, None), ("latest", 0, "0")]
    for n, (point, rank, damage) in enumerate(cases):
        save = tmp_path / f"cut{n}"
        killed = torchrun_raw(*common, f"save={save}", env={"KALEIDO_TEST_KILL_AT": f"{point}:4:{rank}"})
        assert killed.returncode != 0, point
        if damage is not None:  # a shard that was being written (or broke since): shorter than it should be
            shard = save / "4" / f"zero_pp_rank_{damage}_mp_rank_00_optim_states.pt"
            shard.write_bytes(shard.read_bytes()[:1000])
        resumed = torchrun(*common, f"save={save}")
        expected_from = "4" if point in ("complete", "latest") and damage is None else "2"
        assert f"resumed from {save} at iteration {expected_from}" in resumed.stderr, (point, resumed.stderr[-1500:])
        if point == "latest" and damage is not None:
            assert "checkpoint 4 is incomplete" in resumed.stderr
        values = losses(save)
        assert len(values) == 6 and max(abs(a - b) for a, b in zip(whole, values, strict=True)) <= 1e-6, point
        rows = [line.split(",")[0] for line in (save / "train_log.csv").read_text().splitlines()[1:]]
        assert rows == [str(i) for i in range(1, 7)], (point, rows)  # no row twice


def test_two_trainings_never_write_into_one_folder(dataset, tmp_path):
    from sgm.training import lock_save_dir

    holder = lock_save_dir(tmp_path / "run")  # as a running training holds it
    result = subprocess.run(
        [sys.executable, *TRAIN, f"data.root={dataset}", f"save={tmp_path / 'run'}", "train_iters=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and f"another training (pid {os.getpid()}) is writing into" in result.stderr
    holder.close()  # released: the next run may go
    again = subprocess.run(
        [sys.executable, *TRAIN, f"data.root={dataset}", f"save={tmp_path / 'run'}", "train_iters=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-1500:]
