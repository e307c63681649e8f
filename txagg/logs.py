"""What txagg says while it works: log lines on stderr, as text for people and journals or as
JSON lines for log shippers (standard library only: the core logs, the command line chooses
how much and in which format).

Everything goes through the ``txagg`` logger and its children (``txagg.sync``, ``txagg.serve``,
``txagg.access``, ``txagg.cli``). The levels:

* WARNING, the default: retries, 429 waits, counts that lie, a sync loop that failed;
* INFO: one line per poll and per late-arrival check of a sync (the default for ``--follow``
  when stderr is not a terminal), and what a stopped run saved;
* DEBUG: more detail where a module has it.

``--access-log`` lines are INFO records of ``txagg.access``, shown whatever the level.

The text format is ``Warning: MESSAGE`` (``Error:``, ``Info:``, ``Debug:``); lines below WARNING
carry their time after the level (``Info: 2024-05-01T12:00:00.000Z poll: ...``), for a log file
that has no time of its own. The JSON format is one object a line: ``ts``, ``level``,
``logger``, ``message`` and the record's structured fields (``extra=``), e.g. ``event``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "txagg"
ACCESS_LOGGER = "txagg.access"
TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)

# What every LogRecord has: anything else on a record is a structured field (``extra=``).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def timestamp(seconds: float) -> str:
    """An instant as ISO 8601 UTC with milliseconds: ``2024-05-01T12:00:00.000Z``."""
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def fields_of(record: logging.LogRecord) -> dict:
    """The structured fields a record was given with ``extra=``."""
    return {
        name: value
        for name, value in vars(record).items()
        if name not in _STANDARD and not name.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """``Level: message``; below WARNING, ``Level: time message``."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.capitalize()
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            line = f"{level}: {timestamp(record.created)} {message}"
        else:
            line = f"{level}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, then the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in fields_of(record).items():
            body.setdefault(name, value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False, default=str)


class StderrHandler(logging.Handler):
    """Each record as one line on the stderr of the moment (a progress display may have
    replaced ``sys.stderr`` to print above itself)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def handler() -> StderrHandler | None:
    """The stderr handler ``configure`` installed, if any."""
    logger = logging.getLogger(LOGGER)
    return next((h for h in logger.handlers if isinstance(h, StderrHandler)), None)


def configure(level: int = logging.WARNING, format: str = TEXT) -> None:
    """Send txagg's records of ``level`` and above to stderr in ``format`` (text or json).
    Called again, it changes the level and format of the one handler."""
    if format not in FORMATS:
        raise ValueError(f"unknown log format {format!r}: use text or json")
    logger = logging.getLogger(LOGGER)
    installed = handler()
    if installed is None:
        installed = StderrHandler()
        logger.addHandler(installed)
    installed.setFormatter(JsonFormatter() if format == JSON else TextFormatter())
    logger.setLevel(level)


def settings() -> tuple[int, str] | None:
    """(level, format) as configured, for a process that configures its own the same way;
    None when ``configure`` was not called."""
    installed = handler()
    if installed is None:
        return None
    form = JSON if isinstance(installed.formatter, JsonFormatter) else TEXT
    return logging.getLogger(LOGGER).level, form


def enable_access_log(enabled: bool = True) -> None:
    """Show the access log's lines (INFO) whatever the level of the other lines."""
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if enabled else logging.NOTSET)
