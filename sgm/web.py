"""The web page: a Gradio app on ``KaleidoPipeline`` (``python app.py``, ``make app``).

One pipeline is loaded per process, before the page is served; requests queue and run one at a
time (the pipeline is not re-entrant, and one CPU or GPU is busy with one video anyway). A request
reads the prompt, up to ``max_references`` uploads (an image, or a clip with a frame choice), and
the main settings; it returns the video, its contact sheet and a download, and writes the same
item folder as ``sample_video.py`` (``output.mp4``, ``contact_sheet.png``, ``meta.json``, ...)
under ``<output_dir>/app/``. A user's mistake (no prompt, an unreadable upload, a size the model
cannot make) is shown as a message on the page, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import threading
import time
from pathlib import Path

from sgm.data.items import Item, slug, write_item
from sgm.data.references import VIDEO_SUFFIXES, ReferenceError, load_reference
from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings
from sgm.prompt_extend import extend_prompt

log = logging.getLogger(__name__)

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"]
_FRAME = re.compile(r"^\d+(?:\.\d+)?s$|^\d+$")  # 12 (a frame index) or 1.5s (a time)
MAX_SEGMENTS = 4


class RequestError(ValueError):
    """A user's mistake in one request: shown on the page."""


def reference_specs(uploads: list[str | None], frames: list[str]) -> tuple[list[str], list[str]]:
    """``path`` or ``path#frame`` for every filled slot, and one message per bad frame choice."""
    specs, errors = [], []
    for k, (path, frame) in enumerate(zip(uploads, frames, strict=True)):
        frame = (frame or "").strip()
        if not path:
            if frame:
                errors.append(f"reference {k + 1}: a frame is given but no file is uploaded")
            continue
        if frame and not _FRAME.match(frame):
            errors.append(f"reference {k + 1}: frame '{frame}': expected a frame number (12) or a time (1.5s)")
            continue
        specs.append(f"{path}#{frame}" if frame else path)
    return specs, errors


def load_uploads(specs: list[str]) -> tuple[list, list[str]]:
    """The reference images, and one message per upload that cannot be read (every one is reported)."""
    images, errors = [], []
    for k, spec in enumerate(specs):
        try:
            images.append(load_reference(spec))
        except ReferenceError as exc:
            folder = str(Path(spec.split("#")[0]).parent) + os.sep  # the server's upload folder means nothing to users
            errors.append(f"reference {k + 1}: {str(exc).replace(folder, '')}")
    return images, errors


@dataclasses.dataclass
class Request:
    prompt: str
    uploads: list[str | None]
    frames: list[str]
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    segments: int = 1
    overlap: int = 1
    extend: bool = False


class Studio:
    """What the page calls: one pipeline, one lock, numbered item folders."""

    def __init__(self, pipeline: KaleidoPipeline, config: SamplingConfig):
        self.pipeline = pipeline
        self.config = config
        self.out_dir = Path(config.output_dir) / "app"
        self.lock = threading.Lock()
        self.counter = itertools.count()

    def check(self, request: Request) -> list:
        """The reference images of a valid request; ``RequestError`` listing every mistake otherwise."""
        errors = []
        if not request.prompt.strip():
            errors.append("prompt: write what the subjects do")
        specs, frame_errors = reference_specs(request.uploads, request.frames)
        images, read_errors = load_uploads(specs)
        errors += frame_errors + read_errors
        try:
            self.pipeline.check(
                height=request.height,
                width=request.width,
                num_frames=request.num_frames,
                references=len(specs),
                segments=request.segments,
                overlap=request.overlap,
            )
        except ValueError as exc:
            errors.append(str(exc))
        if errors:
            raise RequestError("\n".join(errors))
        return images

    def generate(self, request: Request, on_step=None) -> Path:
        """Make the video of ``request``; returns its item folder."""
        images = self.check(request)
        with self.lock:
            prompt = request.prompt.strip()
            extended = None
            if request.extend and self.config.prompt_extend.enabled:
                extended = extend_prompt(prompt, references=len(images), config=self.config.prompt_extend)
                extended = extended if extended != prompt else None  # a failed extension is logged, not shown
            timings = Timings()
            start = time.perf_counter()
            latents = self.pipeline.generate_latents(
                extended or prompt,
                references=images,
                seed=request.seed,
                height=request.height,
                width=request.width,
                num_frames=request.num_frames,
                steps=request.steps,
                guidance_scale=request.guidance_scale,
                segments=request.segments,
                overlap=request.overlap,
                on_step=on_step,
                timings=timings,
            )
            video = self.pipeline.decode(latents, timings=timings)
            index = next(self.counter)
            target = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{index}_{slug(prompt)}"
            meta = {
                "prompt": prompt,
                "extended_prompt": extended,
                "references": [Path(u).name for u in request.uploads if u],
                "seed": request.seed,
                "video": {
                    "frames": int(video.shape[2]),
                    "height": request.height,
                    "width": request.width,
                    "fps": self.config.sampling_fps,
                    "segments": request.segments,
                    "overlap_latent_frames": request.overlap,
                },
                "settings": {"steps": request.steps, "guidance_scale": request.guidance_scale},
                "timings": {
                    **{k: round(v, 4) for k, v in dataclasses.asdict(timings).items()},
                    "total_s": round(time.perf_counter() - start, 4),
                },
                "load": self.config.load,
            }
            item = Item(index, prompt, prompt=prompt, seed=request.seed)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_item(target, item, images, latents, video, self.config.sampling_fps, meta, False, True)
        log.info("%s: %d frames in %.1f s", target, video.shape[2], time.perf_counter() - start)
        return target


def build_app(studio: Studio):
    """The page (a ``gradio.Blocks``) over ``studio``."""
    import gradio as gr

    pipeline, config = studio.pipeline, studio.config
    settings, geometry = pipeline.settings, pipeline.geometry
    t, multiple = geometry.temporal_stride, geometry.pixel_multiple
    extend_label = (
        f"extend the prompt with {config.prompt_extend.model}"
        if config.prompt_extend.enabled
        else "extend the prompt (set prompt_extend.base_url and .model in the config)"
    )

    # gradio finds its progress bar by this default value (its documented way), hence B008
    def run(prompt, *values, progress=gr.Progress()):  # noqa: B008
        n = config.max_references
        uploads, frames = list(values[:n]), list(values[n : 2 * n])
        height, width, num_frames, steps, guidance, seed, segments, overlap, extend = values[2 * n :]
        request = Request(
            prompt=prompt or "",
            uploads=uploads,
            frames=frames,
            height=int(height),
            width=int(width),
            num_frames=int(num_frames),
            steps=int(steps),
            guidance_scale=float(guidance),
            seed=int(seed),
            segments=int(segments),
            overlap=int(overlap),
            extend=bool(extend),
        )
        progress(0, desc="sampling")
        try:
            target = studio.generate(request, on_step=lambda done, total: progress((done, total), desc="sampling"))
        except RequestError as exc:
            raise gr.Error(str(exc), title="Cannot make this video", print_exception=False) from None
        meta = (target / "meta.json").read_text(encoding="utf-8")
        video = str(target / "output.mp4")
        return video, str(target / "contact_sheet.png"), video, f"```json\n{meta}\n```"

    with gr.Blocks(title="Kaleido", analytics_enabled=False) as app:
        gr.Markdown(
            f"## Kaleido: subjects from reference images, in a video\n"
            f"Model `{pipeline.components.name}` on `{pipeline.device}`. "
            f"Upload up to {config.max_references} references (images, or video clips with a frame) and "
            f"say what the subjects do."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                uploads, frames = [], []
                for k in range(config.max_references):
                    with gr.Row(equal_height=True):
                        uploads.append(
                            gr.File(
                                label=f"reference {k + 1}",
                                file_types=IMAGE_TYPES + sorted(VIDEO_SUFFIXES - {".gif"}),
                                height=110,
                                scale=3,
                                elem_id=f"reference-{k + 1}",
                            )
                        )
                        frames.append(
                            gr.Textbox(
                                label="frame of a clip",
                                placeholder="first; 12 or 1.5s",
                                scale=1,
                                elem_id=f"frame-{k + 1}",
                            )
                        )
                with gr.Accordion("settings", open=True):
                    with gr.Row():
                        height = gr.Number(settings.height, label="height", precision=0, step=multiple)
                        width = gr.Number(settings.width, label="width", precision=0, step=multiple)
                        num_frames = gr.Slider(
                            1,
                            max(settings.num_frames, 20 * t + 1),
                            value=settings.num_frames,
                            step=t,
                            label=f"frames per segment ({t}k+1)",
                            elem_id="frames",
                        )
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=settings.num_steps, step=1, label="steps")
                        guidance = gr.Number(settings.guidance_scale, label="guidance scale")
                        seed = gr.Number(config.seed, label="seed", precision=0)
                    with gr.Row():
                        segments = gr.Slider(1, MAX_SEGMENTS, value=settings.segments, step=1, label="segments")
                        overlap = gr.Number(settings.overlap, label="overlap (latent frames)", precision=0)
                        extend = gr.Checkbox(False, label=extend_label, interactive=config.prompt_extend.enabled)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="video", elem_id="video", autoplay=True, loop=True)
                sheet = gr.Image(label="contact sheet: references | frames", elem_id="sheet")
                download = gr.File(label="download", elem_id="download")
                info = gr.Markdown(elem_id="meta")
        button.click(
            run,
            inputs=[
                prompt,
                *uploads,
                *frames,
                height,
                width,
                num_frames,
                steps,
                guidance,
                seed,
                segments,
                overlap,
                extend,
            ],
            outputs=[video, sheet, download, info],
        )
    app.queue(default_concurrency_limit=1)
    return app
