"""Contact sheets: a video's references beside a grid of its frames, as one PNG to look at."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

GAP = 4  # pixels between cells
SEPARATOR = 12  # extra space between the reference column and the frames
BACKDROP = (255, 255, 255)


def contact_sheet(references: list[Image.Image], frames: np.ndarray, columns: int = 5) -> Image.Image:
    """References stacked in a column on the left, the ``[F, H, W, 3]`` uint8 frames in rows of ``columns``.

    References are fitted (aspect kept) into cells of the frame size, so a sheet has one cell size.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {list(frames.shape)}")
    count, height, width = frames.shape[:3]
    rows = -(-count // columns)
    ref_rows = len(references)
    ref_width = (width + GAP) if references else 0
    sheet_width = GAP + ref_width + (SEPARATOR if references else 0) + columns * (width + GAP)
    sheet_height = GAP + max(rows, ref_rows) * (height + GAP)
    sheet = Image.new("RGB", (sheet_width, sheet_height), BACKDROP)
    for k, reference in enumerate(references):
        cell = ImageOps.pad(reference.convert("RGB"), (width, height), color=BACKDROP)
        sheet.paste(cell, (GAP, GAP + k * (height + GAP)))
    left = GAP + ref_width + (SEPARATOR if references else 0)
    for i, frame in enumerate(frames):
        row, col = divmod(i, columns)
        sheet.paste(Image.fromarray(frame), (left + col * (width + GAP), GAP + row * (height + GAP)))
    return sheet
