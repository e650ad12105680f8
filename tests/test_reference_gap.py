"""tools/reference_gap.py: the altered references are what they claim, the gaps are the right ratios."""

import numpy as np
import pytest

from tools.reference_gap import altered_references, gap_rows, main, parse_sigmas
from tools.shapes_world import detect


def test_altered_references_change_only_what_they_say():
    subjects = [
        {"shape": "star", "colour": "red"},
        {"shape": "circle", "colour": "blue"},
        {"shape": "heart", "colour": "green"},
    ]
    sets = altered_references(subjects, clip_index=3)
    for slot, subject in enumerate(subjects):
        found = {name: detect(np.asarray(sets[name][slot])) for name in ("true", "shape", "colour")}
        assert all(len(d) == 1 for d in found.values())  # one subject on white, read by the evaluation's detector
        true, shape, colour = (found[name][0] for name in ("true", "shape", "colour"))
        assert (true.shape, true.colour) == (subject["shape"], subject["colour"])
        assert shape.colour == subject["colour"] and shape.shape != subject["shape"]
        assert colour.shape == subject["shape"] and colour.colour != subject["colour"]
        sizes = {sets[name][slot].size for name in ("true", "shape", "colour", "blank")}
        assert len(sizes) == 1  # same size (and rotation): drawn from one seed
        assert np.asarray(sets["blank"][slot]).min() == 255
    again = altered_references(subjects, clip_index=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sets["shape"], again["shape"], strict=True))
    other = altered_references(subjects, clip_index=4)
    assert any(a.size != b.size for a, b in zip(sets["true"], other["true"], strict=True))


def test_gap_rows_are_ratios_of_mean_errors():
    errors = {0.9: {"true": [1.0, 3.0], "shape": [3.0, 3.0], "colour": [2.0, 6.0], "blank": [4.0, 4.0]}}
    (row,) = gap_rows(errors)
    assert row["error_true"] == 2.0 and row["n"] == 2
    assert row["shape_gap"] == pytest.approx(0.5) and row["colour_gap"] == pytest.approx(1.0)
    assert row["blank_gap"] == pytest.approx(1.0)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_sigmas("0.9,1.5")
    assert parse_sigmas("0.95, 0.6") == [0.95, 0.6]
    assert main(["--data", str(tmp_path), "--sigmas", "0.9,x"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["--data", str(tmp_path)]) == 2
    assert "no precomputed latents" in capsys.readouterr().err
