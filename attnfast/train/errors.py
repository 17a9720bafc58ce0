"""The exceptions a training or prediction run stops with; the CLI prints each as one ``error: ...`` line.

- :class:`ConfigError`: an invalid option or combination of options, or a file given as input that is not what
  it should be (a checkpoint that is not attnfast's, a run folder that holds another run). Exit status 2.
- :class:`OutputError`: a file of the run could not be written (the disk is full, the folder is read-only);
  every file written before is intact. Exit status 1.
- :class:`DivergedError`: the training loss became NaN or infinite; the checkpoints hold the last good epoch.
  Exit status 1.
"""
from __future__ import annotations


class ConfigError(Exception):
    """An invalid option, combination of options or input file (one line)."""


class OutputError(Exception):
    """A run's output could not be written (one line naming the file and the reason)."""


class DivergedError(Exception):
    """The training loss became non-finite (one line naming the epoch and step)."""


__all__ = ["ConfigError", "OutputError", "DivergedError"]
