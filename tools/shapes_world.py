"""The synthetic multi-subject world of the demo model: a catalogue of subjects, clips, a detector.

Subjects are 8 shapes × 6 colours (two shapes (square, heart) carry a stripe pattern). A clip shows 1–3 subjects
on a plain background, each moving as its caption says; references show each subject alone on
white at its own scale and a small rotation. Sizes follow demo-feasibility.md: at 96×96 pixels a
DiT token covers 16×16 pixels, so sprites of 30–36 pixels span at least 2×2 tokens, and motions
cover most of the frame (6–8 pixels per frame).

The detector (for ``tools/eval_shapes.py``) finds each catalogue colour in a frame by distance to
the palette, grows it into the subject's silhouette (the pixels that differ from the background:
stripes and blurred edges), then names the shape by the best overlap with the catalogue's
silhouettes, sharp or mildly blurred. It reads ground truth under a 2-px blur or noise of 16 grey
levels (``eval_shapes.py --ground-truth --degrade``) as it reads the clean clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "moon", "heart")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
}
PATTERNED = {"square", "heart"}  # drawn with white stripes
MOTIONS = ("left", "right", "up", "down", "bounce", "grow", "shrink", "circle", "still")
BACKGROUNDS = ((110, 110, 110), (70, 90, 110), (120, 100, 80))
BACKGROUND_NAMES = ("grey", "slate", "brown")  # of BACKGROUNDS, in order: no subject colour's name
FRAME = 96
SPRITE = 32
FRAMES = 9
STEP = 7  # pixels per frame for translations
ORDINALS = ("first", "second", "third")
MOTION_WORDS = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "bounce": "bounces",
    "grow": "grows",
    "shrink": "shrinks",
    "circle": "moves in a circle",
    "still": "stands still",
}


def is_held_out(shape: str, colour: str) -> bool:
    """Colour-shape pairs never shown in training (one per colour, spread over the shapes)."""
    return SHAPES.index(shape) % len(COLOURS) == list(COLOURS).index(colour) and SHAPES.index(shape) < len(COLOURS)


def silhouette(shape: str, size: int) -> Image.Image:
    """A white-on-black ``L`` mask of ``shape`` filling a ``size × size`` box."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s, c = size - 1, (size - 1) / 2
    if shape == "circle":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        draw.rectangle((2, 2, s - 2, s - 2), fill=255)
    elif shape == "triangle":
        draw.polygon([(c, 0), (s, s), (0, s)], fill=255)
    elif shape == "diamond":
        draw.polygon([(c, 0), (s, c), (c, s), (0, c)], fill=255)
    elif shape == "cross":
        w = size / 3
        draw.rectangle((w, 0, 2 * w, s), fill=255)
        draw.rectangle((0, w, s, 2 * w), fill=255)
    elif shape == "moon":
        draw.ellipse((0, 0, s, s), fill=255)
        draw.ellipse((size * 0.38, -size * 0.1, s + size * 0.38, s - size * 0.1), fill=0)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = c if k % 2 == 0 else c * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((c + radius * math.cos(angle), c + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "heart":
        r = size / 4
        draw.ellipse((0, 0, 2 * r, 2 * r), fill=255)
        draw.ellipse((2 * r - 1, 0, 4 * r - 1, 2 * r), fill=255)
        draw.polygon([(0, r * 1.1), (s, r * 1.1), (c, s)], fill=255)
    else:
        raise ValueError(f"unknown shape '{shape}'")
    return mask


def sprite(shape: str, colour: str, size: int, angle: float = 0.0) -> Image.Image:
    """The subject as an RGBA image (patterned shapes have white stripes)."""
    mask = silhouette(shape, size)
    rgba = Image.new("RGBA", (size, size), COLOURS[colour] + (255,))
    if shape in PATTERNED:
        draw = ImageDraw.Draw(rgba)
        for y in range(size // 6, size, size // 3):
            draw.rectangle((0, y, size, y + max(1, size // 12)), fill=(255, 255, 255, 255))
    rgba.putalpha(mask)
    return rgba.rotate(angle, resample=Image.BICUBIC, expand=True) if angle else rgba


@dataclass
class Subject:
    shape: str
    colour: str
    motion: str
    start: tuple[float, float]  # centre (x, y) at frame 0
    size: int = SPRITE
    track: list[tuple[float, float, int]] = field(default_factory=list)  # (x, y, size) per frame


def plan_motion(subject: Subject, frames: int) -> None:
    """Fill ``subject.track``: large, readable motions that stay inside the frame."""
    x0, y0 = subject.start
    track = []
    for t in range(frames):
        x, y, size = x0, y0, subject.size
        if subject.motion == "left":
            x = x0 - STEP * t
        elif subject.motion == "right":
            x = x0 + STEP * t
        elif subject.motion == "up":
            y = y0 - STEP * t
        elif subject.motion == "down":
            y = y0 + STEP * t
        elif subject.motion == "bounce":
            y = y0 - 2 * STEP * abs(math.sin(math.pi * t / (frames - 1) * 2))
        elif subject.motion == "grow":
            size = int(subject.size * (0.6 + 0.6 * t / (frames - 1)))
        elif subject.motion == "shrink":
            size = int(subject.size * (1.2 - 0.6 * t / (frames - 1)))
        elif subject.motion == "circle":
            x = x0 + 14 * math.cos(2 * math.pi * t / (frames - 1))
            y = y0 + 14 * math.sin(2 * math.pi * t / (frames - 1))
        track.append((x, y, size))
    subject.track = track


def start_for(motion: str, rng: np.random.Generator) -> tuple[float, float]:
    margin = SPRITE / 2 + 2
    span = STEP * (FRAMES - 1)
    low_x, high_x, low_y, high_y = margin, FRAME - margin, margin, FRAME - margin
    if motion == "left":
        low_x = margin + span
    elif motion == "right":
        high_x = FRAME - margin - span
    elif motion == "up" or motion == "bounce":
        low_y = margin + (span if motion == "up" else 2 * STEP)
    elif motion == "down":
        high_y = FRAME - margin - span
    elif motion == "circle":
        low_x, high_x, low_y, high_y = margin + 14, FRAME - margin - 14, margin + 14, FRAME - margin - 14
    return float(rng.uniform(low_x, max(low_x, high_x))), float(rng.uniform(low_y, max(low_y, high_y)))


def render(subjects: list[Subject], background: tuple[int, int, int], frames: int = FRAMES) -> np.ndarray:
    """``[F, FRAME, FRAME, 3]`` uint8: subjects drawn in order on the background."""
    out = np.empty((frames, FRAME, FRAME, 3), dtype=np.uint8)
    for t in range(frames):
        canvas = Image.new("RGBA", (FRAME, FRAME), background + (255,))
        for subject in subjects:
            x, y, size = subject.track[t]
            image = sprite(subject.shape, subject.colour, size)
            canvas.alpha_composite(image, (int(round(x - image.width / 2)), int(round(y - image.height / 2))))
        out[t] = np.asarray(canvas.convert("RGB"))
    return out


def reference_image(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """The subject alone on white, at its own scale and a small rotation (like a photo of it)."""
    size = int(rng.integers(40, 64))
    image = sprite(shape, colour, size, angle=float(rng.uniform(-15, 15)))
    canvas = Image.new("RGBA", (image.width + 16, image.height + 16), (255, 255, 255, 255))
    canvas.alpha_composite(image, (8, 8))
    return canvas.convert("RGB")


def grid_start(rng: np.random.Generator, grid: int) -> tuple[float, float]:
    """A still subject's centre such that its ``SPRITE``-pixel box starts on the ``grid``-pixel lattice,
    inside the frame: with ``grid`` a DiT token's size, the subject covers whole tokens (the aligned
    world; 16 for 4 x 4 patches, 32 for 8 x 8, where a sprite is one token)."""
    centres = np.arange((SPRITE // 2) % grid, FRAME, grid)
    centres = centres[(centres >= SPRITE / 2) & (centres <= FRAME - SPRITE / 2)]
    return float(rng.choice(centres)), float(rng.choice(centres))


def aligned_reference_image(shape: str, colour: str) -> Image.Image:
    """The subject upright at the clip's size, centred on a white frame-sized canvas: what a
    reference looks like in the aligned world, where copying it needs no rescaling or rotation."""
    canvas = Image.new("RGBA", (FRAME, FRAME), (255, 255, 255, 255))
    image = sprite(shape, colour, SPRITE)
    canvas.alpha_composite(image, ((FRAME - SPRITE) // 2, (FRAME - SPRITE) // 2))
    return canvas.convert("RGB")


def place_phrase(x: float, y: float) -> str:
    """Where a subject starts, on a 3 × 3 grid of the frame: 'at the top left', 'at the left', 'in the centre'."""
    row, column = (min(int(v * 3 // FRAME), 2) for v in (y, x))
    words = " ".join(w for w in (("top", "", "bottom")[row], ("left", "", "right")[column]) if w)
    return f"at the {words}" if words else "in the centre"


def subject_phrase(who: str, motion: str, place: str | None = None) -> str:
    return f"{who} {place} {MOTION_WORDS[motion]}" if place else f"{who} {MOTION_WORDS[motion]}"


def scene_suffix(background: str | None) -> str:
    return f" on a {background} background" if background else ""


def ordinal_caption(motions: list[str], places: list[str] | None = None, background: str | None = None) -> str:
    """'the first object moves left while the second object bounces': no colour or shape named.
    With ``places`` (``place_phrase`` of each subject's start) and ``background`` (a BACKGROUND_NAMES
    entry) the caption also says where each subject starts and on what it is drawn."""
    places = places or [None] * len(motions)
    pairs = zip(motions, places, strict=True)
    phrases = [subject_phrase(f"the {ORDINALS[k]} object", m, p) for k, (m, p) in enumerate(pairs)]
    return " while ".join(phrases) + scene_suffix(background)


def start_places(tracks: list[list]) -> list[str]:
    """``place_phrase`` of each subject's first position (``tracks``: per subject, (x, y, size) per frame)."""
    return [place_phrase(track[0][0], track[0][1]) for track in tracks]


def caption(subjects: list[Subject], rng: np.random.Generator, background: str | None = None) -> str:
    """Half the captions name colours and shapes; the others only say 'the first object'...
    With ``background`` (placed captions) each subject's phrase also says where it starts, and the
    caption ends with the background: the layout comes from the text, what the subjects look like
    from the references."""
    places = start_places([s.track for s in subjects]) if background else [None] * len(subjects)
    if rng.random() < 0.5:
        named = [
            subject_phrase(f"the {s.colour} {s.shape}", s.motion, p) for s, p in zip(subjects, places, strict=True)
        ]
        return " while ".join(named) + scene_suffix(background)
    return ordinal_caption([s.motion for s in subjects], places if background else None, background)


# ---------------------------------------------------------------------------------------------
# Detection


SUBJECT_DISTANCE = 60.0  # RGB distance from the frame's background above which a pixel belongs to some subject
GROW_PIXELS = 6  # how far a subject's silhouette grows from its pure-colour pixels into such pixels
MIN_SEED = 10  # pure-colour pixels a subject needs (a small striped sprite under a blur keeps few)
# Sprite-pixel Gaussian blurs under which each catalogue silhouette is also a template: a shape seen
# through a mild blur (a VAE's, a DiT's) keeps its name instead of matching the roundest template.
TEMPLATE_BLURS = (0.0, 1.0, 1.5, 2.0)


def colour_masks(frame: np.ndarray, threshold: float = 60.0) -> dict[str, np.ndarray]:
    """Boolean mask per catalogue colour: pixels nearest that colour and within ``threshold``."""
    pixels = frame.reshape(-1, 3).astype(np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    distances = np.linalg.norm(pixels[:, None, :] - palette[None], axis=2)  # [P, colours]
    nearest = distances.argmin(axis=1)
    close = distances.min(axis=1) < threshold
    return {name: ((nearest == i) & close).reshape(frame.shape[:2]) for i, name in enumerate(COLOURS)}


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """How many of each pixel's 8 neighbours are set."""
    height, width = mask.shape
    padded = np.pad(mask.astype(np.int8), 1)
    return sum(
        padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    )


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def silhouettes(frame: np.ndarray, min_area: int = 40) -> dict[str, np.ndarray]:
    """Each catalogue colour's subject silhouette in ``[H, W, 3]`` uint8: its pure-colour pixels
    (isolated ones dropped: noise; at least ``MIN_SEED``), grown by up to ``GROW_PIXELS`` through
    pixels that differ from the background (the frame's median colour: backgrounds are plain and
    cover most of a frame); silhouettes of fewer than ``min_area`` pixels are dropped.

    The growth brings back what a blur or a pattern takes from the pure colour: white stripes, and
    edges mixed with the background or a stripe. All colours grow at once; a pixel two of them reach
    in the same step belongs to neither, so touching subjects do not swallow each other.
    """
    pixels = frame.astype(np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    subject = np.linalg.norm(pixels - background, axis=2) > SUBJECT_DISTANCE  # [H, W]
    masks = {}
    for colour, mask in colour_masks(frame).items():
        mask = mask & (_neighbour_count(mask) >= 2)
        if mask.sum() >= MIN_SEED:
            masks[colour] = mask
    claimed = np.logical_or.reduce(list(masks.values())) if masks else np.zeros(frame.shape[:2], dtype=bool)
    for _ in range(GROW_PIXELS):
        grown = {colour: _dilate(mask) & subject & ~claimed for colour, mask in masks.items()}
        reached = sum(g.astype(np.int8) for g in grown.values())
        for colour, new in grown.items():
            new &= reached == 1
            masks[colour] |= new
            claimed |= new
    return {colour: mask for colour, mask in masks.items() if mask.sum() >= min_area}


def _normalised(mask: np.ndarray, size: int = 48) -> np.ndarray:
    """The mask cropped to its bounding box, centred in a square (aspect kept), resized to ``size``."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return np.asarray(Image.fromarray(square * 255).resize((size, size), Image.BILINEAR)) > 127


def _templates(shape: str) -> list[np.ndarray]:
    """``shape``'s normalised silhouette at sprite size, sharp and under each of ``TEMPLATE_BLURS``
    (thresholded at half, where a blurred edge stays put and corners round off)."""
    margin = 8  # room for the blur
    canvas = Image.new("L", (SPRITE + 2 * margin, SPRITE + 2 * margin), 0)
    canvas.paste(silhouette(shape, SPRITE), (margin, margin))
    blurred = [canvas.filter(ImageFilter.GaussianBlur(radius)) if radius else canvas for radius in TEMPLATE_BLURS]
    return [_normalised(np.asarray(image) > 127) for image in blurred]


_TEMPLATES = {shape: _templates(shape) for shape in SHAPES}


def classify_shape(mask: np.ndarray) -> str:
    """The catalogue shape with the best overlap (IoU) between the blob's normalised silhouette and
    one of its templates."""
    blob = _normalised(mask)
    scores = {
        shape: max((blob & t).sum() / max(1, (blob | t).sum()) for t in templates)
        for shape, templates in _TEMPLATES.items()
    }
    return max(scores, key=scores.get)


def count_pieces(mask: np.ndarray, min_area: int = 40) -> int:
    """How many 8-connected pieces of at least ``min_area`` pixels the boolean ``[H, W]`` ``mask``
    falls into: a subject drawn once is one piece; a sample that draws it twice, or cut in two, more.
    (A flood fill: scipy.ndimage.label does this, but scipy is no dependency of ours, and a 96 x 96
    mask is small.)"""
    todo = mask.copy()
    height, width = mask.shape
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if not todo[start]:
            continue
        todo[start] = False
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for v in range(max(y - 1, 0), min(y + 2, height)):
                for u in range(max(x - 1, 0), min(x + 2, width)):
                    if todo[v, u]:
                        todo[v, u] = False
                        stack.append((v, u))
        count += size >= min_area
    return count


@dataclass
class Detection:
    colour: str
    shape: str
    centre: tuple[float, float]
    area: int
    pieces: int  # count_pieces of the silhouette: 1 where the subject is drawn once, whole


def detect(frame: np.ndarray, min_area: int = 40) -> list[Detection]:
    """Every catalogue-coloured subject with a silhouette of at least ``min_area`` pixels: its
    colour, shape, centre, silhouette area and how many pieces of ``min_area`` the silhouette has
    (the shape, centre and area are read from the whole silhouette, as one subject)."""
    found = []
    for colour, mask in silhouettes(frame, min_area).items():
        ys, xs = np.nonzero(mask)
        centre = (float(xs.mean()), float(ys.mean()))
        found.append(Detection(colour, classify_shape(mask), centre, int(mask.sum()), count_pieces(mask, min_area)))
    return found


def motion_direction(track: list[tuple[float, float]], sizes: list[int]) -> str:
    """The motion word that best explains a detected track of centres and areas."""
    xs = np.array([p[0] for p in track])
    ys = np.array([p[1] for p in track])
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    growth = (sizes[-1] - sizes[0]) / max(1, sizes[0])
    spread = max(np.ptp(xs), np.ptp(ys))
    if abs(growth) > 0.5 and spread < 10:
        return "grow" if growth > 0 else "shrink"
    if max(abs(dx), abs(dy)) > 15:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if np.ptp(ys) > 10 and np.ptp(xs) < 8:
        return "bounce"
    if np.ptp(xs) > 10 and np.ptp(ys) > 10:
        return "circle"
    return "still"
