"""Command-line conventions shared by every script.

``script.py --config a.yaml [b.yaml ...] [key=value ...] [--flags]``: ``--base`` is an alias of
``--config`` (the release's name). Boolean flags use ``BooleanOptionalAction`` (``--x`` /
``--no-x``), never ``type=bool``, whose ``"False"`` is true.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TypeVar

from sat.config import ConfigError, load_config

T = TypeVar("T")


def config_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``--config/--base`` and trailing ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "--base",
        dest="config",
        nargs="+",
        default=[],
        metavar="YAML",
        help="YAML files merged left to right, then key=value overrides (dotted keys for sections)",
    )
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def split_overrides(config: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--config a.yaml x=1`` puts ``x=1`` into the file list: move such items to the overrides."""
    files = [item for item in config if "=" not in item]
    moved = [item for item in config if "=" in item]
    return files, moved + list(overrides)


def parse_config(parser: argparse.ArgumentParser, schema: type[T], argv: Sequence[str] | None = None):
    """Parse ``argv`` and load the composed config; a config error exits with one line, status 2."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    files, overrides = split_overrides(args.config, args.overrides)
    try:
        config = load_config(schema, files, overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    return args, config


def setup_logging(level: str = "INFO") -> None:
    """Log lines with time, level and logger to stderr (keeps handlers a host already installed)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger().setLevel(getattr(logging, level))
