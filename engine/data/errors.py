"""Error types of the data pipeline (a leaf: imports nothing from the project).

Every one carries a one-line message that names the file or key at fault; the entry points print it as
``error: <message>`` and exit non-zero.
"""
from __future__ import annotations

from PIL import Image


class CorruptImageError(RuntimeError):
    """An image file that cannot be read or decoded."""


class DataError(ValueError):
    """A missing or malformed data set (one-line message)."""


class GpuDecodeError(DataError):
    """The ``gpu`` pipeline's decode is failing for the device's sake, not a file's: nvjpeg out of memory or
    failing to execute, or most of a batch rejected (one line naming the batch's first file and the status)."""


class UnsupportedImageError(ValueError):
    """An image whose mode has no defined 8-bit RGB rendering (e.g. 32-bit float); the message names the mode."""


# What reading or decoding a bad file raises: PIL (OSError incl. UnidentifiedImageError; SyntaxError,
# ValueError or EOFError from some plugins; DecompressionBombError), torchvision's decoders (RuntimeError),
# absurd sizes (MemoryError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, RuntimeError, MemoryError, Image.DecompressionBombError)
