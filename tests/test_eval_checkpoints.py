"""eval_shapes.py --each-checkpoint: the figures of every checkpoint of a training run, kept across reruns."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sgm.checkpoint import SAT_MODEL_FILE, write_sat_checkpoint
from sgm.training import COMPLETE_FILE, EMA_FILE
from tools.eval_shapes import (
    DEFAULT_CONFIG,
    each_checkpoint,
    evaluate_model,
    load_clips,
    main,
    read_rows,
    rows_table,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "kaleido-shapes"


def save(
    run: Path, iteration: int, state_dict: dict, card: dict | None = None, complete: bool = True, ema: bool = True
) -> None:
    """A checkpoint as train_video_concat.py leaves it: weights (and a weight average), then
    ``complete.json`` with their sizes."""
    folder = write_sat_checkpoint(run, state_dict, card, iteration=str(iteration)).parent
    if ema:
        save_file({"w": next(iter(state_dict.values())) + 1}, str(folder / EMA_FILE))
    if complete:
        files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        (folder / COMPLETE_FILE).write_text(json.dumps({"iteration": iteration, "files": files}))


def test_a_run_of_the_shipped_weights_scores_what_the_shipped_model_scores(tmp_path, capsys):
    """The shipped DiT written into a run's checkpoint scores what the shipped model scores through its
    own config (4 clips, 8 steps: colour 0.5, presence 0.58); a zeroed DiT in the next checkpoint
    scores otherwise, and an unfinished checkpoint (no complete.json) is not evaluated."""
    card = json.loads((SHIPPED / "kaleido_model.json").read_text())
    card.update(vae=str(SHIPPED / "vae"), text_encoder=str(SHIPPED / "umt5"))
    weights = load_file(str(SHIPPED / "dit.safetensors"))
    run, out = tmp_path / "run", tmp_path / "rows.csv"
    save(run, 10, weights, card)
    save(run, 20, {k: torch.zeros_like(v) for k, v in weights.items()}, card)
    save(run, 30, weights, card, complete=False)
    args = ["--limit", "4", "--load", str(run), "--each-checkpoint", "--csv", str(out), "num_steps=8"]
    assert main(args) == 0
    rows = read_rows(out)
    assert [row["iteration"] for row in rows] == ["10", "20"]
    expected = evaluate_model(load_clips(None, 4, seed=1, with_frames=False), DEFAULT_CONFIG, ["num_steps=8"])
    assert expected["colour_accuracy"] > 0 and expected["presence"] > 0
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, abs=1e-6), key
    assert float(rows[1]["presence"]) != pytest.approx(expected["presence"])
    assert "identity_accuracy" in capsys.readouterr().out


def test_reruns_evaluate_only_new_or_changed_weights_and_keep_pruned_rows(tmp_path, caplog):
    run, out = tmp_path / "run", tmp_path / "rows.csv"
    save(run, 10, {"w": torch.zeros(3)})
    save(run, 20, {"w": torch.ones(3)})
    seen = []

    def evaluate(weights: Path) -> dict:
        seen.append((int(weights.parent.name), weights.name))
        return {
            "identity_accuracy": float(torch.load(weights, weights_only=True)["module"]["model.diffusion_model.w"][0])
        }

    settings = {"clips": ["a"], "overrides": []}
    rows, evaluated = each_checkpoint(run, False, out, settings, evaluate)
    assert seen == [(10, SAT_MODEL_FILE), (20, SAT_MODEL_FILE)] and evaluated == 2
    assert [(r["iteration"], float(r["identity_accuracy"])) for r in read_rows(out)] == [("10", 0.0), ("20", 1.0)]
    seen.clear()
    assert each_checkpoint(run, False, out, settings, evaluate)[1] == 0 and seen == []
    # new weights under an old iteration, a new checkpoint, a pruned one
    shutil.rmtree(run / "20")
    save(run, 20, {"w": torch.full((3,), 5.0)})
    save(run, 30, {"w": torch.full((3,), 7.0)})
    shutil.rmtree(run / "10")
    rows, evaluated = each_checkpoint(run, False, out, settings, evaluate)
    assert seen == [(20, SAT_MODEL_FILE), (30, SAT_MODEL_FILE)] and evaluated == 2
    assert [(r["iteration"], float(r["identity_accuracy"])) for r in rows] == [("10", 0.0), ("20", 5.0), ("30", 7.0)]
    assert read_rows(out) == [{k: str(v) for k, v in row.items()} for row in rows]
    # other settings never mix into the same file
    with pytest.raises(ValueError, match=f"{out}: rows made with other settings"):
        each_checkpoint(run, False, out, {**settings, "overrides": ["shift=3"]}, evaluate)
    # the weight averages; a checkpoint without one (a run without ema_decay) is reported and skipped
    save(run, 40, {"w": torch.zeros(3)}, ema=False)
    seen.clear()
    caplog.set_level(logging.WARNING)
    each_checkpoint(run, True, tmp_path / "ema.csv", settings, lambda w: seen.append(w.name) or {"x": 1.0})
    assert seen == [EMA_FILE, EMA_FILE] and f"no {EMA_FILE}: skipped" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_rows_from_before_a_new_figure_are_kept_beside_rows_with_it(tmp_path):
    """A figure added to the evaluation (``one_piece``) must not break a CSV written before it."""
    run, out = tmp_path / "run", tmp_path / "rows.csv"
    save(run, 10, {"w": torch.zeros(3)})
    settings = {"clips": ["a"], "overrides": []}
    each_checkpoint(run, False, out, settings, lambda w: {"identity_accuracy": 0.25})
    save(run, 20, {"w": torch.ones(3)})
    rows, evaluated = each_checkpoint(
        run, False, out, settings, lambda w: {"identity_accuracy": 0.5, "one_piece": 0.75}
    )
    assert evaluated == 1 and [r.get("one_piece", "") for r in read_rows(out)] == ["", "0.750000"]
    assert rows_table(read_rows(out)).splitlines() == [
        "iteration  identity_accuracy  one_piece",
        "       10              0.250          -",
        "       20              0.500      0.750",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--each-checkpoint", "--load", "{run}"], "needs --load <training run folder> and --csv"),
        (["--each-checkpoint", "--load", "{tmp}", "--csv", "x.csv"], "no complete checkpoint"),
        (["--each-checkpoint", "--load", "{run}", "--csv", "x.csv", "--reconstruct"], "not --ground-truth"),
        (["--ema"], "apply to --each-checkpoint only"),
        (
            ["--each-checkpoint", "--load", "{run}", "--csv", "x.csv", "--limit", "1", "--config", "{tmp}/no.yaml"],
            "no.yaml: no such file",
        ),
        (["--limit", "1", "--config", "configs/sampling/shapes.yaml", "seed=3"], "write key=value overrides before"),
        (["--limit", "1", "--load", "{tmp}/missing.pt"], "load: {tmp}/missing.pt: checkpoint not found"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    save(tmp_path / "run", 10, {"w": torch.zeros(3)})
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path, run=tmp_path / "run") for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = message.format(tmp=tmp_path, run=tmp_path / "run")
    assert len(err) == 1 and message in err[0], err
