"""What a command prints: -q (errors and the final line only) / default / -v (details), for gradmatch's own
messages and progress bars and for transformers' and datasets' alike; no terminal colour codes in files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

#: ANSI escape sequences (colours, bold) that some libraries write whatever the output is.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
QUIET, NORMAL, VERBOSE = 0, 1, 2
_LEVELS = {QUIET: "error", NORMAL: "warning", VERBOSE: "info"}


class _PlainText(io.TextIOBase):
    """A text stream that drops colour codes (transformers' load report is bold even in a log file)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_ANSI.sub("", text) if "\x1b" in text else text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")


def configure(level: int = NORMAL) -> None:
    """Set every library's verbosity for one command: our log lines go to stderr as bare messages; with
    ``QUIET`` only errors remain and no progress bar is drawn; with ``NORMAL`` only gradmatch's own bar of a long
    command (the Trainer's for train); with ``VERBOSE`` informational lines and the libraries' bars too.

    transformers and datasets are configured through their environment variables (they are imported
    lazily, later; `gradmatch merge` never imports them) and directly when already imported."""
    if not sys.stderr.isatty() and not isinstance(sys.stderr, _PlainText):
        sys.stderr = _PlainText(sys.stderr)
    ours = logging.getLogger("gradmatch")
    for handler in [h for h in ours.handlers if getattr(h, "_gradmatch", False)]:
        ours.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._gradmatch = True  # type: ignore[attr-defined]
    ours.addHandler(handler)
    ours.propagate = False
    ours.setLevel({QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}[level])
    os.environ["TRANSFORMERS_VERBOSITY"] = os.environ["DATASETS_VERBOSITY"] = _LEVELS[level]
    libraries = level == VERBOSE  # their bars (loading weights, writing shards, mapping a data set) only with -v
    if not libraries:
        for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ[var] = "1"
    if level == QUIET:
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        warnings.simplefilter("ignore")
    if "transformers" in sys.modules:
        import transformers.utils.logging as tlog

        tlog.set_verbosity(getattr(logging, _LEVELS[level].upper()))
        (tlog.enable_progress_bar if libraries else tlog.disable_progress_bar)()
    if "datasets" in sys.modules:
        import datasets.utils.logging as dlog

        dlog.set_verbosity(getattr(logging, _LEVELS[level].upper()))
        (dlog.enable_progress_bar if libraries else dlog.disable_progress_bar)()


#: What :func:`configure` changes, so that :func:`configured` can put it back.
_ENV_VARS = ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
             "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")


@contextlib.contextmanager
def configured(level: int = NORMAL):
    """:func:`configure` for the duration of one command, then everything as it was (a command run in-process,
    as tests and notebooks do, leaves no global state behind)."""
    env = {var: os.environ.get(var) for var in _ENV_VARS}
    ours = logging.getLogger("gradmatch")
    saved = (list(ours.handlers), ours.level, ours.propagate, sys.stderr)
    with warnings.catch_warnings():
        configure(level)
        try:
            yield
        finally:
            for var, value in env.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
            ours.handlers[:], ours.level, ours.propagate, sys.stderr = saved[0], saved[1], saved[2], saved[3]
