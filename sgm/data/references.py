"""Reference inputs: read an image or one frame of a clip, and fit it to the video size.

A reference is an image (PNG, JPEG, WebP, BMP, ...: alpha composited on white, greyscale and
16-bit converted to 8-bit RGB) or a short video clip from which one frame is taken: the first by
default, ``clip.mp4#12`` for frame 12, ``clip.mp4#1.5s`` for the frame at 1.5 seconds.

``fit_reference`` is the release's preprocessing (spec-dit §7.2): aspect-fit into the target
size with LANCZOS (sizes truncated, not rounded), then a white letterbox, centred with the extra
pixel on the right/bottom.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

RELEASE_MAX_REFERENCES = 3  # the most references per sample the release was trained with
MAX_REFERENCE_PIXELS = 8192 * 8192  # larger images are refused from their header (decompression bombs)
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif"}
WHITE = (255, 255, 255)
_FRAME_SELECTOR = re.compile(r"^(?P<path>.+)#(?:(?P<frame>\d+)|(?P<seconds>\d+(?:\.\d+)?)s)$")


class ReferenceError(ValueError):
    """A reference that cannot be used, with the reason."""


def split_selector(spec: str) -> tuple[str, int | None, float | None]:
    """``clip.mp4#12`` -> (path, 12, None); ``clip.mp4#1.5s`` -> (path, None, 1.5); else (spec, None, None)."""
    match = _FRAME_SELECTOR.match(spec)
    if not match or Path(spec).exists():
        return spec, None, None
    frame = match.group("frame")
    seconds = match.group("seconds")
    return match.group("path"), None if frame is None else int(frame), None if seconds is None else float(seconds)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16-bit and greyscale converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _read_clip_frame(path: str, frame: int | None, seconds: float | None) -> Image.Image:
    import decord

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
    except Exception as exc:  # decord raises its own DECORDError for unreadable files
        raise ReferenceError(f"{path}: cannot read the video clip ({str(exc).splitlines()[0]})") from None
    count = len(reader)
    index = 0 if frame is None else frame
    if seconds is not None:
        index = int(round(seconds * reader.get_avg_fps()))
    if index >= count:
        where = f"{seconds} s (frame {index})" if seconds is not None else f"frame {index}"
        raise ReferenceError(f"{path}: {where} is past the end of the clip ({count} frames)")
    return Image.fromarray(reader[index].asnumpy())


def _gif_frame(image: Image.Image, path: str, frame: int | None, seconds: float | None) -> None:
    """Seek an (animated) GIF to the selected frame: an index, or the frame shown at ``seconds``."""
    index = frame or 0
    if seconds is not None:
        elapsed, index = 0.0, 0
        while True:
            image.seek(index)
            elapsed += image.info.get("duration", 100) / 1000
            if elapsed > seconds:
                break
            index += 1
    count = getattr(image, "n_frames", 1)
    if index >= count:
        where = f"{seconds} s (frame {index})" if seconds is not None else f"frame {index}"
        raise ReferenceError(f"{path}: {where} is past the end of the GIF ({count} frames)")
    image.seek(index)


def load_reference(spec: str) -> Image.Image:
    """Open a reference image or clip frame as 8-bit RGB; ``ReferenceError`` with the reason otherwise.

    Images larger than ``MAX_REFERENCE_PIXELS`` are refused from their header, before any pixel is
    decoded (a small file can claim a huge image). GIFs, still or animated, are read by Pillow
    (``anim.gif#3``, ``anim.gif#0.5s``).
    """
    path, frame, seconds = split_selector(spec)
    if Path(path).is_dir():
        raise ReferenceError(f"{path}: is a folder; a reference is an image or a video clip")
    if not Path(path).is_file():
        raise ReferenceError(f"{path}: reference file not found")
    is_gif = Path(path).suffix.lower() == ".gif"
    if Path(path).suffix.lower() in VIDEO_SUFFIXES and not is_gif:
        return _read_clip_frame(path, frame, seconds)
    if (frame is not None or seconds is not None) and not is_gif:
        raise ReferenceError(f"{spec}: a frame selector needs a video clip, not an image")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_REFERENCE_PIXELS:
                raise ReferenceError(
                    f"{path}: {image.width}x{image.height} = {image.width * image.height:,} pixels, more than the "
                    f"{MAX_REFERENCE_PIXELS:,} a reference may have (it is shrunk to the video size anyway)"
                )
            if is_gif:
                _gif_frame(image, path, frame, seconds)
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, EOFError) as exc:
        raise ReferenceError(f"{path}: not a readable image ({exc})") from None


def fit_reference(image: Image.Image, height: int, width: int) -> Image.Image:
    """Aspect-fit into ``height × width`` (LANCZOS, truncated sizes), letterboxed on white."""
    ratio = image.width / image.height
    if ratio > width / height:
        new_w, new_h = width, int(width / ratio)
    else:
        new_w, new_h = int(height * ratio), height
    resized = image.resize((max(new_w, 1), max(new_h, 1)), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
    return canvas


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB -> ``[3, H, W]`` float32 in [-1, 1] as ``(x − 127.5)/127.5``."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (array.to(torch.float32) - 127.5) / 127.5


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8, truncating like the release."""
    frames = ((video.float() + 1) / 2).clamp(0, 1) * 255
    return frames.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
