"""The one exception type for bad training data (the CLI prints it as ``error: ...`` and exits 2)."""
from __future__ import annotations


class AttnfastDataError(Exception):
    """Bad or missing data: a missing column or image, a corrupt image, a label out of range, an empty split.

    The message is one line naming the file (and column or row) at fault.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def one_line(exc: BaseException) -> str:
    """The user-facing line of a data error, also when a DataLoader worker re-raised it.

    A worker re-raises ``type(exc)(msg)`` with the worker's traceback folded into ``msg``; the
    original message is then the text after the last ``AttnfastDataError:`` marker.
    """
    text = str(exc)
    marker = "AttnfastDataError:"
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return " ".join(text.split())
