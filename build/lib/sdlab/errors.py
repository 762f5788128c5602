"""sdlab's own exceptions: every mistake a user can make ends in one of these, with a message that
names the argument or the file, the value found, and a fix.

They also derive from the built-in exception a Python programmer would expect (`ValueError`,
`FileNotFoundError`, ...), so `except ValueError` keeps working. The command line turns any of them
into one line on stderr and exit status 2.
"""

from __future__ import annotations


class SdlabError(Exception):
    """Base class of every error sdlab raises on purpose."""


class CheckpointError(SdlabError, ValueError):
    """A file is not a checkpoint sdlab can load (or not safely): the message says what was found."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class ArgumentError(SdlabError, ValueError):
    """An argument of `generate` or of the command line is of the wrong type or out of range."""


class InputImageError(ArgumentError):
    """An input image or mask cannot be read, or not as a person means it."""


class OutputPathError(ArgumentError):
    """The output path cannot be written (missing folder, existing file, a directory, no extension)."""


class DeviceError(ArgumentError):
    """The device does not exist or this build of PyTorch does not support it."""


class NumericalError(SdlabError, FloatingPointError):
    """NaN or infinity appeared (in weights, arguments or latents); the message names where."""
