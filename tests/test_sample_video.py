"""sample_video.py end to end on the tiny config (random DiT, committed tiny text encoder and VAE)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample_video
from sat.parallel import free_port
from sgm.data.references import fit_reference, load_reference, split_selector

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--config", str(ROOT / "configs/model/kaleido_tiny.yaml"), str(ROOT / "configs/sampling/tiny.yaml")]
FAST = ["num_steps=3", "model.arch.num_layers=2"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (10, 5, 30, 25))
    rgba.save(folder / "rgba.png")
    Image.new("RGB", (50, 80), (20, 120, 240)).save(folder / "photo.jpg", quality=95)
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(folder / "grey16.png")
    with imageio.get_writer(folder / "clip.mp4", fps=4, codec="libx264", macro_block_size=16) as writer:
        for value in (0, 80, 160, 240):
            writer.append_data(np.full((32, 32, 3), value, dtype=np.uint8))
    (folder / "not_an_image.png").write_text("hello")
    return folder


def run(tmp_path, *extra, prompt=None, ref=()):
    argv = BASE + FAST + [f"output_dir={tmp_path}"] + list(extra)
    if prompt is not None:
        argv += ["--prompt", prompt, "--ref", *ref]
    return sample_video.main(argv)


def test_flag_input_writes_a_playable_mp4(tmp_path, refs):
    assert run(tmp_path, prompt="a red ball", ref=[str(refs / "rgba.png")]) == 0
    (item,) = list(tmp_path.iterdir())
    assert item.name == "0_a_red_ball"
    reader = imageio.get_reader(item / "output.mp4")
    frames = [f for f in reader]
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert reader.get_meta_data()["fps"] == 8
    meta = json.loads((item / "meta.json").read_text())
    assert meta["seed"] == 1234 and meta["video"] == {
        "frames": 9,
        "height": 64,
        "width": 96,
        "fps": 8,
        "segments": 1,
        "overlap_latent_frames": 1,
    }
    assert "sampling_num_frames: 3" in meta["config"] and meta["timings"]["total_s"] > 0
    assert (item / "text.txt").read_text() == "a red ball\n"
    assert Image.open(item / "subject_0.png").size == (40, 30)  # the original reference, not the letterboxed one
    sheet = np.asarray(Image.open(item / "contact_sheet.png"))
    assert sheet.shape == (4 + 2 * (64 + 4), 4 + (96 + 4) + 12 + 5 * (96 + 4), 3)  # 1 reference, 9 frames in 2 rows
    first = sheet[4 : 4 + 64, 4 + 100 + 12 : 4 + 100 + 12 + 96].astype(int)
    # the frame as written, up to the mp4's loss (large on the random model's noise): same mean colour
    assert np.abs(first.mean(axis=(0, 1)) - frames[0].mean(axis=(0, 1))).max() < 3


def test_contact_sheet_layout():
    from sgm.data.contact_sheet import contact_sheet

    frames = np.stack([np.full((8, 10, 3), 20 * i, dtype=np.uint8) for i in range(7)])  # [F, H, W, 3]
    tall_red = Image.new("RGB", (5, 16), (255, 0, 0))
    sheet = np.asarray(contact_sheet([tall_red, Image.new("RGB", (10, 8), (0, 0, 255))], frames, columns=3))
    assert sheet.shape == (4 + 3 * 12, 4 + 14 + 12 + 3 * 14, 3)  # 3 rows of frames, 2 references
    ref_cell = sheet[4:12, 4:14]
    assert (ref_cell[:, 4:6] == [255, 0, 0]).all() and (ref_cell[:, 0] == 255).all()  # fitted, letterboxed in white
    assert (sheet[16:24, 4:14] == [0, 0, 255]).all()
    for i in range(7):
        row, col = divmod(i, 3)
        top, left = 4 + row * 12, 4 + 14 + 12 + col * 14
        assert (sheet[top : top + 8, left : left + 10] == 20 * i).all()
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        contact_sheet([], frames[0])


def test_same_seed_same_latents_and_rerun_skips(tmp_path, refs, caplog):
    for out in ("a", "b"):
        assert run(tmp_path / out, "only_save_latents=true", prompt="a cube", ref=[str(refs / "photo.jpg")]) == 0
    a = load_file(next((tmp_path / "a").iterdir()) / "latents.safetensors")["latents"]
    b = load_file(next((tmp_path / "b").iterdir()) / "latents.safetensors")["latents"]
    assert a.shape == (1, 3, 16, 8, 12) and torch.equal(a, b)
    assert run(tmp_path / "a", "only_save_latents=true", prompt="a cube", ref=[str(refs / "photo.jpg")]) == 0
    assert "0 done, 1 skipped" in caplog.text  # the same inputs: nothing to do


def test_a_rerun_skips_only_what_the_same_inputs_made(tmp_path, refs, caplog):
    """The skip is a proof: a changed seed, reference content, setting or output kind regenerates."""
    ref = tmp_path / "ref.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(ref)
    out = tmp_path / "out"

    def latents_after(*extra):
        caplog.clear()
        assert run(out, "only_save_latents=true", *extra, prompt="a cube", ref=[str(ref)]) == 0
        return load_file(next(out.iterdir()) / "latents.safetensors")["latents"]

    first = latents_after()
    assert torch.equal(latents_after(), first) and "0 done, 1 skipped" in caplog.text
    reseeded = latents_after("seed=7")
    assert "inputs changed" in caplog.text and "1 done, 0 skipped" in caplog.text and not torch.equal(reseeded, first)
    Image.new("RGB", (20, 20), (10, 10, 200)).save(ref)  # same path, other content
    recoloured = latents_after("seed=7")
    assert "1 done" in caplog.text and not torch.equal(recoloured, reseeded)
    latents_after("seed=7", "guidance_scale=3.0")
    assert "1 done" in caplog.text
    caplog.clear()
    assert run(out, "seed=7", "guidance_scale=3.0", prompt="a cube", ref=[str(ref)]) == 0  # now the mp4
    item = next(out.iterdir())
    assert "1 done" in caplog.text and (item / "output.mp4").is_file() and not (item / "latents.safetensors").exists()
    assert [p.name for p in out.iterdir()] == [item.name]  # nothing left aside


def test_temporary_folders_of_killed_runs_are_removed(tmp_path, refs):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    out = tmp_path / "out"
    (out / f".0_a_cube.tmp{dead.pid}").mkdir(parents=True)
    (out / f".0_a_cube.tmp{dead.pid}" / "meta.json").write_text("{}")
    alive = out / f".1_other.tmp{os.getpid()}"  # this process is running: not touched
    alive.mkdir()
    assert run(out, "only_save_latents=true", prompt="a cube", ref=[str(refs / "photo.jpg")]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["0_a_cube", alive.name])


def test_txt_and_jsonl_inputs_with_every_reference_kind(tmp_path, refs):
    txt = tmp_path / "in.txt"
    txt.write_text(f"two subjects@@{refs / 'rgba.png'}@@{refs / 'clip.mp4'}#2\nno references at all\n")
    assert run(tmp_path / "txt", f"input_file={txt}", "only_save_latents=true") == 0
    assert sorted(p.name for p in (tmp_path / "txt").iterdir()) == ["0_two_subjects", "1_no_references_at_all"]
    jsonl = tmp_path / "in.jsonl"
    records = [
        {"prompt": "a grey thing", "references": [str(refs / "grey16.png"), f"{refs / 'clip.mp4'}#0.5s"], "seed": 5},
        {"prompt": "a photo", "references": [str(refs / "photo.jpg")]},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert run(tmp_path / "jsonl", f"input_file={jsonl}", "only_save_latents=true") == 0
    meta = json.loads((tmp_path / "jsonl" / "0_a_grey_thing" / "meta.json").read_text())
    assert meta["seed"] == 5
    assert json.loads((tmp_path / "jsonl" / "1_a_photo" / "meta.json").read_text())["seed"] == 1234 + 1


def test_bad_inputs_are_reported_and_the_rest_goes_on(tmp_path, refs, caplog):
    lines = [
        f"missing@@{refs / 'nope.png'}",
        f"not an image@@{refs / 'not_an_image.png'}",
        f"past the end@@{refs / 'clip.mp4'}#99",
        f"@@{refs / 'rgba.png'}",
        f"too many@@{refs / 'rgba.png'}@@{refs / 'rgba.png'}@@{refs / 'rgba.png'}@@{refs / 'rgba.png'}",
        "",  # blank and comment lines are skipped, not errors
        "# a comment",
        "a good one",
    ]
    txt = tmp_path / "bad.txt"
    txt.write_text("\n".join(lines) + "\n")
    assert run(tmp_path / "out", f"input_file={txt}", "only_save_latents=true") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["7_a_good_one", "failed_items.jsonl"]
    listed = [json.loads(line) for line in (tmp_path / "out" / "failed_items.jsonl").read_text().splitlines()]
    assert [f["line"] for f in listed] == [1, 2, 3, 4, 5] and "empty prompt" in listed[3]["error"]
    for expected in (
        "reference file not found",
        "not a readable image",
        "is past the end of the clip (4 frames)",
        "line 4): empty prompt",
        "4 references, max_references is 3",
        "1 done, 0 skipped, 5 failed",  # the blank and the comment line are not items
    ):
        assert expected in caplog.text
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"prompt": "x", "refs": []}\n{not json\n')
    assert run(tmp_path / "out2", f"input_file={jsonl}") == 1
    assert "malformed JSONL line: unknown key(s) ['refs']" in caplog.text


def test_config_is_validated_before_models_load(tmp_path):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "sampling_image_size=[60,96]", prompt="x")
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        run(tmp_path, "sequence_parallel_size=2", prompt="x")  # needs torchrun


def test_portrait_video_and_two_evaluations_per_step(tmp_path):
    from sat.config import load_config
    from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings

    assert run(tmp_path, "sampling_image_size=[96,64]", prompt="tall") == 0
    frames = [f for f in imageio.get_reader(next(tmp_path.iterdir()) / "output.mp4")]
    assert frames[0].shape == (96, 64, 3)

    config = load_config(SamplingConfig, BASE[1:], FAST)
    pipeline = KaleidoPipeline.from_config(config, device="cpu")
    batches = []
    forward = pipeline.dit.forward
    pipeline.dit.forward = lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k)
    timings = Timings()
    reference = [Image.new("RGB", (10, 10))]
    out = pipeline.generate_latents("a", references=reference, height=96, width=64, num_frames=5, timings=timings)
    assert out.shape == (1, 2, 16, 12, 8)
    assert timings.network_calls == 3 and batches == [2, 2, 2]  # one [uncond, cond] batch per step
    assert pipeline("a", steps=1).shape == (1, 3, 9, 64, 96)  # the config's size and 3 latent frames
    with pytest.raises(ValueError, match="expected 4k\\+1 frames"):
        pipeline(prompt="a", height=96, width=64, num_frames=6)
    with pytest.raises(ValueError, match="4 references, max_references is 3"):
        pipeline("a", references=reference * 4, height=96, width=64, num_frames=5)


def test_reference_helpers():
    assert split_selector("clip.mp4#12") == ("clip.mp4", 12, None)
    assert split_selector("clip.mp4#1.5s") == ("clip.mp4", None, 1.5)
    assert split_selector("a#b.png") == ("a#b.png", None, None)
    wide = fit_reference(Image.new("RGB", (200, 50), (0, 0, 0)), 64, 96)
    assert wide.size == (96, 64)
    pixels = np.asarray(wide)
    assert (pixels[0] == 255).all() and (pixels[32] == 0).all()  # 96x24 image centred, white above
    assert np.asarray(fit_reference(Image.new("RGB", (10, 40)), 64, 96))[:, 0].min() == 255


@pytest.mark.distributed
@pytest.mark.parametrize("split", ["height", "width"])
def test_two_process_sequence_parallel_equals_one_process(tmp_path, refs, split):
    common = BASE + FAST + ["only_save_latents=true", "sampling_image_size=[64,128]", f"sp_split={split}"]
    common += ["--prompt", "two subjects", "--ref", str(refs / "rgba.png"), str(refs / "photo.jpg")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "sample_video.py", f"output_dir={tmp_path / 'one'}", *common],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    double = subprocess.run(
        [*launch, "sample_video.py", f"output_dir={tmp_path / 'two'}", "sequence_parallel_size=2", *common],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert double.returncode == 0, double.stderr[-2000:]
    a = load_file(next((tmp_path / "one").iterdir()) / "latents.safetensors")["latents"]
    b = load_file(next((tmp_path / "two").iterdir()) / "latents.safetensors")["latents"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_reference_loading_modes(refs):
    assert load_reference(str(refs / "rgba.png")).getpixel((0, 0)) == (255, 255, 255)  # alpha on white
    assert load_reference(str(refs / "grey16.png")).mode == "RGB"
    frame = np.asarray(load_reference(f"{refs / 'clip.mp4'}#3"))
    assert abs(int(frame.mean()) - 240) < 12


def test_release_prompt_compat_feeds_the_whole_line_to_t5(tmp_path, refs):
    line = f"a cube@@{refs / 'photo.jpg'}"
    (tmp_path / "in.txt").write_text(line + "\n")
    for name, compat in (("ours", "false"), ("release", "true")):
        argv = [f"input_file={tmp_path / 'in.txt'}", "only_save_latents=true", f"release_prompt_compat={compat}"]
        assert run(tmp_path / name, *argv) == 0
    ours, release = (next((tmp_path / n).iterdir()) for n in ("ours", "release"))
    assert json.loads((ours / "meta.json").read_text())["prompt"] == "a cube"
    assert json.loads((release / "meta.json").read_text())["prompt"] == line  # the @@path reaches T5 too
    a, b = (load_file(d / "latents.safetensors")["latents"] for d in (ours, release))
    assert not torch.equal(a, b)  # same seed and references: only the text differs


def test_a_batch_of_mixed_lines_makes_every_good_item_and_reports_every_bad_one_once(tmp_path, refs, caplog):
    good_ref = str(refs / "photo.jpg")
    long_prompt = "一只红色的球" * 40  # 240 characters of 3 bytes: a folder name must stay under 255 bytes
    records = [
        ({"prompt": "a good one", "references": [good_ref]}, None),
        ({"prompt": None}, '"prompt": expected a string'),
        ({"prompt": 3}, '"prompt": expected a string'),
        ({"prompt": ["x"]}, '"prompt": expected a string'),
        ({"prompt": "refs as a string", "references": good_ref}, '"references": expected a list'),
        ({"prompt": "refs as a dict", "references": {"a": 1}}, '"references": expected a list'),
        ({"prompt": "nested refs", "references": [[good_ref]]}, '"references": expected a list'),
        ({"prompt": "float seed", "seed": 1.5}, "seed: expected an integer"),
        ({"prompt": "bool seed", "seed": True}, "seed: expected an integer"),
        ({"prompt": "huge seed", "seed": 2**70}, "seed: expected 0 to"),
        ({"prompt": "negative seed", "seed": -1}, "seed: expected 0 to"),
        ({"prompt": long_prompt}, None),
        ({"prompt": "another good one", "seed": 3}, None),
    ]
    lines = ["\ufeff# a comment line, then a blank one", ""] + [json.dumps(r, ensure_ascii=False) for r, _ in records]
    path = tmp_path / "items.JSONL"  # any case of .jsonl / .json is JSON lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run(tmp_path / "out", f"input_file={path}", "only_save_latents=true") == 1
    made = {p.name.split("_", 1)[0] for p in (tmp_path / "out").iterdir() if p.is_dir()}
    good = {str(i + 2) for i, (_, error) in enumerate(records) if error is None}
    assert made == good  # indices are line numbers - 1: the comment and the blank line count
    for i, (_, error) in enumerate(records):
        if error is not None:
            reported = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"item {i + 2} (")]
            assert len(reported) == 1 and error in reported[0], (i, reported)
    long_index = next(i for i, (r, _) in enumerate(records) if r.get("prompt") == long_prompt) + 2
    long_folder = next(p for p in (tmp_path / "out").iterdir() if p.name.startswith(f"{long_index}_"))
    assert len(long_folder.name.encode()) <= 255


def test_inputs_and_values_that_are_refused_before_loading(tmp_path, refs, capsys):
    cases = [
        (["guidance_scale=nan"], "guidance_scale: expected a finite number"),
        (["shift=inf"], "shift: expected a finite number above 0"),
        (["shift=0"], "shift: expected a finite number above 0"),
        (["sampler=heun"], "sampler: expected one of euler, stochastic, got 'heun'"),
        (["model.arch.num_layers=0"], "num_layers must be at least 1"),
        (["device=gpu"], "device: expected auto, cpu or cuda"),
    ]
    if not torch.cuda.is_available():
        cases.append((["device=cuda"], "no CUDA GPU"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as info:
            run(tmp_path, *extra, prompt="x")
        assert info.value.code == 2 and message in capsys.readouterr().err, extra
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un café\n".encode("latin-1"))
    with pytest.raises(SystemExit):
        run(tmp_path, f"input_file={latin1}")
    assert "latin1.txt is not UTF-8 text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_video.main(BASE + FAST + [f"output_dir={tmp_path}", "--ref", str(refs / "photo.jpg")])
    assert "--ref needs --prompt" in capsys.readouterr().err


def test_reference_kinds_that_used_to_fail(tmp_path, refs):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    Image.new("RGB", (16, 16), (250, 250, 0)).save(tmp_path / "still.gif")
    assert load_reference(str(tmp_path / "anim.gif")).getpixel((8, 8))[0] > 200  # frame 0: red
    assert load_reference(f"{tmp_path / 'anim.gif'}#2").getpixel((8, 8))[2] > 200  # frame 2: blue
    assert load_reference(f"{tmp_path / 'anim.gif'}#0.3s").getpixel((8, 8))[1] > 200  # 200 ms frames: green
    assert load_reference(str(tmp_path / "still.gif")).getpixel((8, 8)) == (250, 250, 0)
    from sgm.data.references import ReferenceError as RefError

    with pytest.raises(RefError, match="past the end of the GIF \\(3 frames\\)"):
        load_reference(f"{tmp_path / 'anim.gif'}#5")
    with pytest.raises(RefError, match="is a folder"):
        load_reference(str(tmp_path))
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # a small file that claims 81 MP
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(RefError, match="81,000,000 pixels, more than the 67,108,864"):
        load_reference(str(tmp_path / "bomb.png"))


def test_user_errors_are_one_line(tmp_path, refs, capsys):
    from safetensors.torch import save_file

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        run(a_file / "out", prompt="x")
    assert info.value.code == 2 and "output_dir: cannot create" in capsys.readouterr().err
    weights = tmp_path / "dit.safetensors"
    save_file({"x": torch.zeros(1000)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:500])  # truncated by a failed download
    torch.save({"module": {"x": torch.zeros(1000)}}, tmp_path / "dit.pt")
    (tmp_path / "dit.pt").write_bytes((tmp_path / "dit.pt").read_bytes()[:300])
    for path in (weights, tmp_path / "dit.pt"):
        with pytest.raises(SystemExit) as info:
            run(tmp_path / "out", f"load={path}", "model.name=kaleido-tiny", prompt="x")
        err = capsys.readouterr().err
        assert info.value.code == 2 and "truncated or corrupt" in err and "Traceback" not in err, err


def test_a_full_disk_loses_one_item_and_keeps_the_rest(tmp_path, monkeypatch, caplog):
    real = sample_video.write_item
    calls = []

    def full_after_one(target, *args, **kwargs):
        calls.append(target.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(sample_video, "write_item", full_after_one)
    (tmp_path / "in.txt").write_text("first\nsecond\nthird\n")
    assert run(tmp_path / "out", f"input_file={tmp_path / 'in.txt'}", "only_save_latents=true") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["0_first", "2_third"]
    assert "item 1: cannot write" in caplog.text and "No space left on device" in caplog.text
    failures = (tmp_path / "out" / "failed_items.jsonl").read_text()
    assert '"index": 1' in failures and "No space left" in failures


@pytest.mark.distributed
def test_two_processes_report_a_bad_item_without_a_launcher_crash_dump(tmp_path, refs):
    (tmp_path / "in.txt").write_text(f"a good one\nmissing@@{refs / 'nope.png'}\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    argv = [*launch, "sample_video.py", *BASE, *FAST, f"output_dir={tmp_path / 'out'}", "only_save_latents=true"]
    argv.append(f"input_file={tmp_path / 'in.txt'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ChildFailedError" not in result.stderr, result.stderr[-2000:]
    assert "1 done, 0 skipped, 1 failed (listed in failed_items*.jsonl)" in result.stderr  # the run's totals
    assert "(2 item(s) in this run)" in result.stderr
    listed = (tmp_path / "out" / "failed_items.rank1.jsonl").read_text()  # item 1 went to data-parallel rank 1
    assert "reference file not found" in listed
