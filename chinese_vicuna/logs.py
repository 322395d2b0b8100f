"""The one logging set-up of every script and tool (light: imports nothing heavy, so CPU tools start fast)."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_FORMAT = "%(message)s"  # tools whose log lines are their report


def configure_logging(level: int = logging.INFO, plain: bool = False) -> None:
    """Log lines to stderr from here on: `level` and up, with time, level and logger name (`plain`:
    the message alone)."""
    logging.basicConfig(level=level, format=PLAIN_FORMAT if plain else LOG_FORMAT)
