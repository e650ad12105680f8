"""Serve the Kaleido web page (Gradio) on the library's pipeline.

    python app.py                                        # the shipped demo model on CPU (make app)
    python app.py --config configs/sampling/Y.yaml load=CHECKPOINT [key=value ...] [--port 7860]

The config is a sampling config, as for ``sample_video.py``: it names the model and gives the
page's default settings (size, frames, steps, guidance, seed, segments, prompt extension). The
model loads once, before the page is served; requests queue. The page itself is ``sgm.web``.
Listens on 127.0.0.1 unless ``--host`` says otherwise (there is no authentication).
"""

from __future__ import annotations

import logging
import os
import sys

# Before gradio is imported: no usage statistics or version checks leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from sat.arguments import config_parser, parse_config  # noqa: E402
from sgm.pipeline import KaleidoPipeline, SamplingConfig, resolve_components, validate_sampling  # noqa: E402

log = logging.getLogger("app")
DEMO_CONFIG = ["configs/sampling/shapes.yaml"]


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.set_defaults(config=DEMO_CONFIG)
    args, config = parse_config(parser, SamplingConfig, argv)
    try:
        components = resolve_components(config)
        validate_sampling(config, components)
        pipeline = KaleidoPipeline.from_config(config, components=components)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")

    from sgm.web import Studio, build_app

    studio = Studio(pipeline, config)
    app = build_app(studio)
    log.info("serving %s on http://%s:%d", components.name, args.host, args.port)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            ssr_mode=False,  # no Node.js server: the page is the prebuilt static client
            allowed_paths=[str(studio.out_dir.resolve())],
            max_file_size="200mb",
            quiet=True,
        )
    except OSError as exc:  # the port is taken
        parser.exit(2, f"error: --port {args.port}: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
