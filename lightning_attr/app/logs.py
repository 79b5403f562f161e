"""Console and job-log plumbing of the Hydra apps: where messages go, and how a refused run ends.

Hydra configures the root logger for each job: the console and ``<run dir>/<job name>.log``
(``train.log``, ``attribute.log``). Lightning attaches its own console handler and stops propagation
when it is imported before logging is configured, which left those files empty; warnings went to
stderr only. :func:`route_logging_to_job_log` sends both to the root logger.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("lightning_attr")


class UsageError(ValueError):
    """The command line asks for something that cannot run; the message names the fix (an override)."""


def cli_hints(text: str, prefix: str = "callbacks.attribution") -> str:
    """The callback's messages name its arguments in Python (``overwrite=True``, ``mode='end'``); on the
    command line they are overrides: ``callbacks.attribution.overwrite=true``, ``callbacks.attribution.mode=end``."""
    from lightning_attr import AttributionCallback

    names = "|".join(inspect.signature(AttributionCallback).parameters)

    def override(match: re.Match) -> str:
        value = match.group(2).strip("'\"")
        return f"{prefix}.{match.group(1)}={ {'True': 'true', 'False': 'false', 'None': 'null'}.get(value, value)}"

    return re.sub(rf"(?<![\w.])({names})=('[^']*'|\"[^\"]*\"|True|False|None|[\d.]+)", override, text)


class _CliHintsInWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = cli_hints(record.getMessage()), ()
        return True


def route_logging_to_job_log() -> None:
    """Lightning's and this package's messages, and warnings, go to the root logger's handlers."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_attr"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)  # the console handler Lightning adds when root has none
        logger.propagate = True
    logging.getLogger("lightning_attr").setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _CliHintsInWarnings) for f in warnings_logger.filters):
        warnings_logger.addFilter(_CliHintsInWarnings())
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, _NotOnConsole) for f in handler.filters):
            handler.addFilter(_NotOnConsole())  # the console shows these as a table


class _NotOnConsole(logging.Filter):
    """Keeps the summary rows (already printed as a table) out of the console; the log file gets them."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning_attr.app.summary import SUMMARY_LOGGER

        return not record.name.startswith(SUMMARY_LOGGER)


@contextmanager
def exit_on_usage_error() -> Iterator[None]:
    """A :class:`UsageError` ends the command with its message and exit status 2, without a traceback."""
    try:
        yield
    except UsageError as err:
        log.error("error: %s", err)
        raise SystemExit(2) from None
