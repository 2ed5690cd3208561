"""Logging set-up: one line per event, text (coloured on a terminal) or JSON."""
from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure"]

_COLOURS = {"DEBUG": "\033[2m", "INFO": "", "WARNING": "\033[33m", "ERROR": "\033[31m",
            "CRITICAL": "\033[1;31m"}


class _TextFormatter(logging.Formatter):
    def __init__(self, colour: bool):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.colour:
            c = _COLOURS.get(record.levelname, "")
            if c:
                line = f"{c}{line}\033[0m"
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(colour=hasattr(stream, "isatty") and stream.isatty()))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
