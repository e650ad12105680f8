"""tools/reference_gap.py: the altered references are what they claim, the gaps are the right ratios."""

import numpy as np
import pytest

from tools.reference_gap import altered_inputs, gap_rows, main, parse_sigmas
from tools.shapes_world import PATTERNED, aligned_reference_image, detect


def test_altered_references_change_only_what_they_say():
    subjects = [
        {"shape": "star", "colour": "red", "motion": "left"},
        {"shape": "circle", "colour": "blue", "motion": "up"},
        {"shape": "heart", "colour": "green", "motion": "still"},
    ]
    inputs = altered_inputs(subjects, clip_index=3)
    sets = {name: refs for name, (_, refs) in inputs.items()}
    captions = {name: caption for name, (caption, _) in inputs.items()}
    assert captions["true"] == captions["shape"] == captions["blank"]
    assert "red" not in captions["true"] and "star" not in captions["true"]  # ordinal: nothing named
    assert captions["named"].startswith("the red star ") and " the blue circle " in captions["named"]
    assert sets["named"] == sets["named_shape"] == sets["blank"]
    for slot, subject in enumerate(subjects):
        found = {name: detect(np.asarray(sets[name][slot])) for name in ("true", "shape", "colour")}
        assert all(len(d) == 1 for d in found.values())  # one subject on white, read by the evaluation's detector
        true, shape, colour = (found[name][0] for name in ("true", "shape", "colour"))
        assert (true.shape, true.colour) == (subject["shape"], subject["colour"])
        assert shape.colour == subject["colour"] and shape.shape != subject["shape"]
        assert (shape.shape in PATTERNED) == (subject["shape"] in PATTERNED)  # stripes are not shape
        assert colour.shape == subject["shape"] and colour.colour != subject["colour"]
        sizes = {sets[name][slot].size for name in ("true", "shape", "colour", "blank")}
        assert len(sizes) == 1  # same size (and rotation): drawn from one seed
        assert np.asarray(sets["blank"][slot]).min() == 255
        named_other = f"the {subject['colour']} {shape.shape} "  # the caption names the shape variant's shape
        assert named_other in captions["named_shape"] + " "
    again = altered_inputs(subjects, clip_index=3)["shape"][1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sets["shape"], again, strict=True))
    other = altered_inputs(subjects, clip_index=4)["true"][1]
    assert any(a.size != b.size for a, b in zip(sets["true"], other, strict=True))


def test_aligned_references_are_the_aligned_worlds():
    """``--aligned``: every variant is drawn as ``make_shapes_dataset.py --aligned`` draws references
    (upright, the clip's size, frame-sized canvas), whatever the clip's seed; only the named property
    changes."""
    subjects = [
        {"shape": "star", "colour": "red", "motion": "still"},
        {"shape": "heart", "colour": "blue", "motion": "still"},
    ]
    for clip_index in (3, 4):
        sets = {name: refs for name, (_, refs) in altered_inputs(subjects, clip_index, aligned=True).items()}
        for slot, subject in enumerate(subjects):
            expected = np.asarray(aligned_reference_image(subject["shape"], subject["colour"]))
            assert np.array_equal(np.asarray(sets["true"][slot]), expected)
            shape = detect(np.asarray(sets["shape"][slot]))[0]
            colour = detect(np.asarray(sets["colour"][slot]))[0]
            assert shape.shape != subject["shape"] and shape.colour == subject["colour"]
            assert colour.shape == subject["shape"] and colour.colour != subject["colour"]
            assert {sets[name][slot].size for name in ("true", "shape", "colour", "blank")} == {expected.shape[:2]}


def test_gap_rows_are_ratios_of_mean_errors():
    errors = {
        0.9: {
            "true": [1.0, 3.0],
            "shape": [3.0, 3.0],
            "colour": [2.0, 6.0],
            "blank": [4.0, 4.0],
            "named": [2.0, 2.0],
            "named_shape": [2.0, 3.0],
        }
    }
    (row,) = gap_rows(errors)
    assert row["error_true"] == 2.0 and row["n"] == 2
    assert row["shape_gap"] == pytest.approx(0.5) and row["colour_gap"] == pytest.approx(1.0)
    assert row["blank_gap"] == pytest.approx(1.0) and row["text_shape_gap"] == pytest.approx(0.25)
    # paired differences shape - true = (2, 0): std sqrt(2), over sqrt(2) and the mean 2
    assert row["shape_gap_se"] == pytest.approx(0.5) and row["blank_gap_se"] == pytest.approx(1 / 2)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_sigmas("0.9,1.5")
    assert parse_sigmas("0.95, 0.6") == [0.95, 0.6]
    assert main(["--data", str(tmp_path), "--sigmas", "0.9,x"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["--data", str(tmp_path)]) == 2
    assert "no precomputed latents" in capsys.readouterr().err
