"""Training data in the release's layout: ``labels/<id>.txt``, ``videos/<id>.mp4``, ``references/<id>/*``.

Each sample: the caption (first line of the label file), the video's frames chosen by the
release's rule (spec-dit §10 item 7: skip 3 frames, resample to the target fps, fall back to
striding over the whole clip, then to the largest 4k+1 count, padded with the last frame),
resized to cover the target size (bicubic) and centre-cropped, and 1 to ``max_references``
reference images (every image file of the sample's folder, in name order; the release reads only
``ref1.png``-``ref3.png``) letterboxed on white to the video size, as at sampling time.

The dataset iterates over a deterministic permutation of ``(seed, epoch)``, sharded by
data-parallel rank and then by loader worker. A sample that cannot be used (corrupt video,
missing caption or reference folder, unreadable image) is skipped with a warning and counted;
training never stops on one bad sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from sgm.data.references import RELEASE_MAX_REFERENCES, ReferenceError, fit_reference, image_to_tensor, load_reference

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SKIP_FRAMES = 3  # the release drops the first 3 frames of every clip


@dataclass
class DataConfig:
    """The ``data:`` config section."""

    root: str = ""
    height: int = 480
    width: int = 832
    num_frames: int = 81  # video frames, 4k+1
    fps: int = 16
    max_references: int = RELEASE_MAX_REFERENCES
    num_workers: int = 2
    seed: int = 0
    latents: bool = False  # read <root>/latents/<id>.safetensors (tools/precompute_latents.py), skip the VAE


LATENT_FOLDER = "latents"


class BadSampleError(ValueError):
    """A sample that cannot be used, with the reason."""


def select_frames(
    total: int, source_fps: float, target_fps: float, num_frames: int, *, frames_multiple: int
) -> list[int]:
    """Indices of ``num_frames`` source frames (the release's rule; repeats the last when short, after
    the largest count the VAE encodes whole: ``frames_multiple·k + 1``, ``sgm.models.wan_vae.frame_multiple``)."""
    if total <= 0:
        raise BadSampleError("the video has no frames")
    stride = source_fps / target_fps
    if total - SKIP_FRAMES > (num_frames - 1) * stride:
        return [SKIP_FRAMES + int(i * stride) for i in range(num_frames)]
    if total > num_frames + 2 * SKIP_FRAMES:
        return np.linspace(SKIP_FRAMES, total - 1 - SKIP_FRAMES, num_frames).astype(int).tolist()
    count = 1 + frames_multiple * ((min(total, num_frames) - 1) // frames_multiple)  # largest mk+1 that fits
    return list(range(count)) + [count - 1] * (num_frames - count)


def resize_cover(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[F, 3, h, w]`` float -> ``[F, 3, height, width]``: scaled to cover (bicubic), centre-cropped."""
    scale = max(height / frames.shape[2], width / frames.shape[3])
    size = (max(height, math.ceil(frames.shape[2] * scale)), max(width, math.ceil(frames.shape[3] * scale)))
    frames = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return frames[:, :, top : top + height, left : left + width]


def read_video(path: Path, config: DataConfig, frames_multiple: int) -> tuple[torch.Tensor, int]:
    """``[F, 3, H, W]`` float32 in [-1, 1] and the fps, or ``BadSampleError``."""
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        indices = select_frames(
            len(reader), reader.get_avg_fps(), config.fps, config.num_frames, frames_multiple=frames_multiple
        )
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy())  # [F, h, w, 3] uint8
    except BadSampleError:
        raise
    except Exception as exc:  # decord raises its own error types for corrupt files
        raise BadSampleError(f"{path}: cannot decode ({str(exc).splitlines()[0][:200]})") from None
    frames = frames.permute(0, 3, 1, 2).to(torch.float32)  # [F, 3, h, w]
    frames = resize_cover(frames, config.height, config.width)
    return (frames.clamp(0, 255) - 127.5) / 127.5, config.fps


class VideoDataset(IterableDataset):
    """Iterates collated batches of ``batch_size`` samples forever, epoch after epoch.

    Batches are formed from this rank's order (samples with equal reference counts together) and
    dealt to loader workers round-robin, so a DataLoader (``batch_size=None``) yields them in order
    and ``(epoch, chunk)`` of the last batch is a resume point.
    """

    def __init__(
        self,
        config: DataConfig,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        start_epoch: int = 0,
        start_chunk: int = 0,
        *,
        frames_multiple: int,
        targets: bool = False,
    ):
        super().__init__()
        root = Path(config.root)
        if not config.root or not (root / "videos").is_dir():
            raise FileNotFoundError(f"data.root: '{config.root}' has no videos/ folder (expected the release layout)")
        self.ids = sorted(p.stem for p in (root / "videos").iterdir() if p.suffix == ".mp4")
        if not self.ids:
            raise FileNotFoundError(f"data.root: {root / 'videos'} holds no .mp4 files")
        if config.num_frames < 1 or (config.num_frames - 1) % frames_multiple:
            raise ValueError(
                f"data.num_frames: expected {frames_multiple}k+1 video frames (what the VAE encodes whole), "
                f"got {config.num_frames}"
            )
        self.frames_multiple = frames_multiple
        self.targets = targets  # also read <root>/targets/<id>.safetensors (sgm.diffusion.alignment)
        self.warned: set[str] = set()  # bad samples already reported (per loader worker)
        self.config = config
        self.root = root
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start_epoch = start_epoch
        self.start_chunk = start_chunk

    def load(self, sample_id: str) -> dict:
        """One sample (with its ``alignment_targets`` when the dataset reads targets), or
        ``BadSampleError`` naming it and the reason."""
        sample = self.load_sample(sample_id)
        if self.targets:
            sample["alignment_targets"] = self.load_targets(sample_id)
        return sample

    def load_targets(self, sample_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from sgm.diffusion.alignment import TARGETS_FOLDER, check_targets

        path = self.root / TARGETS_FOLDER / f"{sample_id}.safetensors"
        if not path.is_file():
            raise BadSampleError(f"{sample_id}: no alignment targets {path}")
        targets = load_file(str(path))
        try:
            check_targets(targets, str(path))
        except ValueError as exc:
            raise BadSampleError(f"{sample_id}: {exc}") from None
        return targets

    def load_sample(self, sample_id: str) -> dict:
        label = self.root / "labels" / f"{sample_id}.txt"
        if not label.is_file():
            raise BadSampleError(f"{sample_id}: missing caption {label}")
        caption = (label.read_text(encoding="utf-8").splitlines() or [""])[0].strip()
        if self.config.latents:
            return self.load_latents(sample_id, caption)
        ref_dir = self.root / "references" / sample_id
        paths = sorted(p for p in ref_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if ref_dir.is_dir() else []
        if not paths:
            raise BadSampleError(f"{sample_id}: no reference images in {ref_dir}")
        video, fps = read_video(self.root / "videos" / f"{sample_id}.mp4", self.config, self.frames_multiple)
        try:
            images = [load_reference(str(p)) for p in paths[: self.config.max_references]]
        except ReferenceError as exc:
            raise BadSampleError(f"{sample_id}: {exc}") from None
        refs = [image_to_tensor(fit_reference(im, self.config.height, self.config.width)) for im in images]
        return {
            "id": sample_id,
            "mp4": video,
            "txt": caption,
            "fps": fps,
            "num_frames": self.config.num_frames,
            "subject_images": torch.stack(refs),
        }

    def load_latents(self, sample_id: str, caption: str) -> dict:
        """A precomputed sample: ``latents [T, C, h, w]``, ``subject_latents [N, C, h, w]`` and, in
        files that have it, ``subject_mask [T, h, w]`` (bool)."""
        from safetensors.torch import load_file

        path = self.root / LATENT_FOLDER / f"{sample_id}.safetensors"
        if not path.is_file():
            raise BadSampleError(f"{sample_id}: no precomputed latents {path}")
        tensors = load_file(str(path))
        mask = {"subject_mask": tensors["subject_mask"].bool()} if "subject_mask" in tensors else {}
        return {
            **mask,
            "id": sample_id,
            "latents": tensors["video"],
            "subject_latents": tensors["subjects"][: self.config.max_references],
            "txt": caption,
            "fps": self.config.fps,
            "num_frames": self.config.num_frames,
        }

    def order(self, epoch: int) -> list[str]:
        """This rank's samples of ``epoch``: a permutation seeded by (seed, epoch), then every world_size-th."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        permutation = torch.randperm(len(self.ids), generator=generator).tolist()
        return [self.ids[i] for i in permutation[self.rank :: self.world_size]]

    def reference_count(self, sample_id: str) -> int:
        folder = self.root / "references" / sample_id
        if not folder.is_dir():
            return 0
        count = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return min(count, self.config.max_references)

    def chunks(self, epoch: int) -> list[list[str]]:
        """This rank's batches of ``epoch``: every batch holds samples with the same number of references
        (the DiT takes one ``[B, N, ...]`` tensor), in the order of the seeded permutation."""
        if self.batch_size == 1:
            return [[sample_id] for sample_id in self.order(epoch)]
        open_batches: dict[int, list[str]] = {}
        batches = []
        for sample_id in self.order(epoch):
            group = open_batches.setdefault(self.reference_count(sample_id), [])
            group.append(sample_id)
            if len(group) == self.batch_size:
                batches.append(group)
                open_batches[self.reference_count(sample_id)] = []
        batches += [group for _, group in sorted(open_batches.items()) if group]
        return batches

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        epoch, first = self.start_epoch, self.start_chunk
        while True:
            batches = self.chunks(epoch)
            for chunk in range(first, len(batches)):
                if (chunk - first) % workers != worker_id:
                    continue
                samples = []
                for sample_id in batches[chunk]:
                    try:
                        samples.append(self.load(sample_id))
                    except BadSampleError as exc:
                        if sample_id not in self.warned:  # once per sample, not once per epoch
                            self.warned.add(sample_id)
                            log.warning("skipping sample %s", exc)
                        samples.append({"id": sample_id, "bad": str(exc)})
                yield {**collate(samples), "epoch": epoch, "chunk": chunk}
            epoch, first = epoch + 1, 0


def collate(samples: list[dict]) -> dict:
    """Stack the good samples; bad ones are only counted (``skipped``). ``size`` 0: nothing usable."""
    good = [s for s in samples if "bad" not in s]
    bad = [(s["id"], s["bad"]) for s in samples if "bad" in s]
    batch = {"skipped": len(bad), "bad": bad, "size": len(good)}
    if not good:
        return batch
    refs = "subject_latents" if "subject_latents" in good[0] else "subject_images"
    counts = {s[refs].shape[0] for s in good}
    if len(counts) > 1:  # a reference folder changed since the batches were formed
        keep = max(counts, key=lambda n: sum(s[refs].shape[0] == n for s in good))
        bad += [
            (s["id"], f"{s[refs].shape[0]} references, the batch has {keep}") for s in good if s[refs].shape[0] != keep
        ]
        batch["skipped"] = len(bad)
        good = [s for s in good if s[refs].shape[0] == keep]
        batch["size"] = len(good)
    video = "latents" if refs == "subject_latents" else "mp4"
    batch.update(
        {video: torch.stack([s[video] for s in good]), refs: torch.stack([s[refs] for s in good])},
        txt=[s["txt"] for s in good],
        fps=torch.tensor([s["fps"] for s in good]),
        num_frames=torch.tensor([s["num_frames"] for s in good]),
        ids=[s["id"] for s in good],
    )
    if all("subject_mask" in s for s in good):
        batch["subject_mask"] = torch.stack([s["subject_mask"] for s in good])
    if all("alignment_targets" in s for s in good):
        keys = good[0]["alignment_targets"]
        batch["alignment_targets"] = {k: torch.stack([s["alignment_targets"][k] for s in good]) for k in keys}
    return batch


class BadDataError(RuntimeError):
    """Not one usable sample in a whole epoch: training cannot make progress."""


def next_usable_batch(loader: Iterator[dict], batches_per_epoch: int) -> tuple[dict, list[tuple[str, str]]]:
    """The next batch with at least one good sample, and the ``(id, reason)`` of every bad sample
    skipped on the way (a sample bad in every epoch comes back each epoch: count distinct ids).

    After ``batches_per_epoch`` empty batches in a row every sample of an epoch has been tried
    and was bad: ``BadDataError`` naming the first reasons, instead of looping for ever.
    """
    skipped: list[tuple[str, str]] = []
    for _ in range(max(1, batches_per_epoch)):
        batch = next(loader)
        skipped += batch["bad"]
        if batch["size"]:
            return batch, skipped
    first = "; ".join(reason for _, reason in skipped[:3])
    raise BadDataError(
        f"no usable sample in {batches_per_epoch} batch(es) in a row, a whole epoch: every sample is bad "
        f"(first reasons: {first})"
    )
