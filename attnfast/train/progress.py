"""Progress bars for ``attnfast train`` / ``attnfast predict``: drawn on a terminal, never into a file.

- On a terminal (stderr a TTY) a tqdm bar is drawn and redrawn in place with carriage returns.
- Anywhere else (stderr redirected to a file, a pipe, ``tee``, a CI log) no bar is drawn: its frames would
  fill the file with ``\\r`` and escape codes. The per-epoch lines printed on stdout are the log.
- A terminal that reports a size of 0x0 (a pseudo-terminal nobody sized: ``docker run -t``, ``script``,
  some CI runners) gets ``$COLUMNS`` x ``$LINES`` or 80x24. Given 0 columns, tqdm would draw nothing at all.
"""
from __future__ import annotations

import os
import shutil
import sys

from tqdm import tqdm

FALLBACK_SIZE = (80, 24)


def terminal_fd(stream) -> int | None:
    """The file descriptor of ``stream`` when it is a terminal, else ``None``."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO, pytest's capture, a closed stream
        return None
    return fd if os.isatty(fd) else None


def bar(iterable, desc: str, enabled: bool = True, stream=None, total: int | None = None) -> tqdm:
    """``tqdm(iterable, desc=desc)`` on ``stream`` (default stderr), disabled unless ``enabled`` and a terminal.

    The bar is cleared when the loop ends (``leave=False``), so the lines logged between loops stay
    clean. A disabled bar still accepts ``set_postfix`` and iterates ``iterable`` unchanged. ``total``:
    the number of items, for an iterable without ``len``.
    """
    stream = sys.stderr if stream is None else stream
    fd = terminal_fd(stream) if enabled else None
    if fd is None:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        sizing = {"dynamic_ncols": True}  # follows the window when it is resized
    else:
        cols, lines = shutil.get_terminal_size(FALLBACK_SIZE)  # $COLUMNS/$LINES, stdout's size, else 80x24
        sizing = {"ncols": cols if size.columns <= 0 else size.columns,
                  "nrows": lines if size.lines <= 0 else size.lines}
    return tqdm(iterable, desc=desc, total=total, leave=False, file=stream, **sizing)


__all__ = ["bar", "terminal_fd"]
