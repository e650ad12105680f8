"""Write the demo model's text encoder and example inputs under ``assets/kaleido-shapes/``.

    python tools/make_shapes_assets.py [--out assets/kaleido-shapes]

``umt5/``: a sentencepiece word-level tokenizer trained on every caption the shapes world can write (each
word is one token) and a random, frozen 2-layer umT5 of kaleido-tiny's text width, saved
under the release's file name; the DiT learns to read its features. ``examples/``: reference images
and ``examples.txt`` of held-out clips of the shapes world (1, 2 and 3 references, each clip with a
colour–shape pair never seen in training), with captions that name no colour or shape, so what the
subjects look like can only come from the references. Seeded: rerunning writes the same files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.registry import ARCHITECTURES  # noqa: E402
from tools.make_shapes_dataset import HELD_OUT_EVERY, make_clip  # noqa: E402
from tools.make_tiny_assets import make_tokenizer, make_umt5  # noqa: E402
from tools.shapes_world import (  # noqa: E402
    BACKGROUND_NAMES,
    COLOURS,
    FRAME,
    MOTIONS,
    ORDINALS,
    SHAPES,
    ordinal_caption,
    place_phrase,
    scene_suffix,
    start_places,
    subject_phrase,
)

log = logging.getLogger("make_shapes_assets")
ROOT = Path(__file__).resolve().parents[1]
DEMO_SEED = 12345  # clips of another seed than the training set's
DEMO_CLIPS_PER_COUNT = 2  # examples with 1, 2 and 3 references each


def caption_corpus(placed: bool = False) -> list[str]:
    """Every subject phrase, and ordinal captions of up to three subjects; ``placed``: also every
    subject phrase at every start place (``shapes_world.place_phrase``) on every background."""
    lines = [
        subject_phrase(f"the {colour} {shape}", motion)
        for colour, shape, motion in itertools.product(COLOURS, SHAPES, MOTIONS)
    ]
    for count in range(1, len(ORDINALS) + 1):
        lines += [ordinal_caption(list(motions)) for motions in itertools.product(MOTIONS, repeat=count)]
    if placed:
        places = sorted({place_phrase(x, y) for x in range(FRAME) for y in range(FRAME)})
        whos = [f"the {colour} {shape}" for colour, shape in itertools.product(COLOURS, SHAPES)]
        whos += [f"the {ordinal} object" for ordinal in ORDINALS]
        lines += [
            subject_phrase(who, motion, place) + scene_suffix(background)
            for who, motion, place, background in itertools.product(whos, MOTIONS, places, BACKGROUND_NAMES)
        ]
    return lines


def caption_words(placed: bool = False) -> set[str]:
    return {word for line in caption_corpus(placed) for word in line.split()}


def demo_clips(seed: int, per_count: int) -> list[dict]:
    """Held-out clips of ``seed``: ``per_count`` with each number of subjects, in index order."""
    chosen: dict[int, list[dict]] = {n: [] for n in range(1, len(ORDINALS) + 1)}
    index = HELD_OUT_EVERY - 1
    while any(len(v) < per_count for v in chosen.values()):
        clip = make_clip(seed, index)
        n = len(clip["subjects"])
        if len(chosen[n]) < per_count:
            chosen[n].append(clip)
        index += HELD_OUT_EVERY
    return [clip for n in sorted(chosen) for clip in chosen[n]]


def write_examples(folder: Path, clips: list[dict], placed: bool = False) -> None:
    """``examples.txt`` (``caption@@ref@@ref``, paths relative to the repository) and ``examples.json``;
    ``placed``: the captions say where each subject starts and the background."""
    folder.mkdir(parents=True, exist_ok=True)
    lines, meta = [], []
    for clip in clips:
        refs = []
        for k, image in enumerate(clip["references"], start=1):
            path = folder / f"{clip['id']}_ref{k}.png"
            image.save(path)
            refs.append(path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path))
        places = start_places([s["track"] for s in clip["subjects"]]) if placed else None
        text = ordinal_caption([s["motion"] for s in clip["subjects"]], places, clip["background"] if placed else None)
        lines.append("@@".join([text, *refs]))
        meta.append({"id": clip["id"], "caption": text, "subjects": clip["subjects"], "references": refs})
    (folder / "examples.txt").write_text("\n".join(lines) + "\n")
    (folder / "examples.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "assets" / "kaleido-shapes"), help="output folder")
    parser.add_argument(
        "--placed",
        action="store_true",
        help="captions also say where each subject starts and the background (for make_shapes_dataset.py --placed)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out).resolve()
    umt5 = out / "umt5"
    umt5.mkdir(parents=True, exist_ok=True)
    corpus = caption_corpus(args.placed)
    vocab = make_tokenizer(umt5, corpus, vocab_size=len(caption_words(args.placed)) + 3, model_type="word")
    make_umt5(umt5, vocab, ARCHITECTURES["kaleido-tiny"].text_dim)
    write_examples(out / "examples", demo_clips(DEMO_SEED, DEMO_CLIPS_PER_COUNT), args.placed)
    log.info("wrote the shapes text encoder (vocabulary %d) and demo examples under %s", vocab, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
