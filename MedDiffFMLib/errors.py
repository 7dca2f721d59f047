"""Exceptions raised by MedDiffFMLib.

Every error the library raises on purpose derives from :class:`MedDiffFMError`, so callers
(the CLI, the Slicer module) can catch one type and show its message, which always says what
was wrong and what to do about it.
"""

from __future__ import annotations


class MedDiffFMError(Exception):
    """Base class of all MedDiffFM errors."""


class InputError(MedDiffFMError, ValueError):
    """An image, label map or parameter is unusable (wrong dimension, NaNs, unknown name...)."""


class MaskError(InputError):
    """A mask is empty, on a grid that does not overlap the image, or otherwise unusable."""


class ReadError(MedDiffFMError, OSError):
    """A file or DICOM folder could not be read."""


class OutputExistsError(MedDiffFMError, FileExistsError):
    """The output file exists and overwriting was not requested."""


class WeightsError(MedDiffFMError):
    """Model weights are missing, corrupted, unsafe, or do not match the task or base model."""


class ChecksumError(WeightsError):
    """A file's SHA-256 does not match the expected one."""


class ResourceError(MedDiffFMError, MemoryError):
    """The device ran out of memory even at the smallest workload."""


class CancelledError(MedDiffFMError):
    """The user cancelled a running job."""
