"""Every error a user can fix, in one hierarchy, each with its process exit status.

The command line (:mod:`vicl_fast.cli`), the main job (:mod:`vicl_fast.main_job`) and the Python
API (:mod:`vicl_fast.inference`) raise these; a console entry point prints ``str(exc)`` on one line
and returns ``exc.exit_code``. Python callers can catch :class:`ViclFastError`; the input and
usage errors are also ``ValueError`` (a bad argument, not a failure of the machine).

====  ============================  =====================================================
code  class                         meaning
====  ============================  =====================================================
1     :class:`ViclFastError`        anything else the user must act on (e.g. a corrupt cache)
2     :class:`UsageError`           a bad or missing option / argument
3     :class:`UnreadableFileError`  a file is missing, unreadable or in the wrong format
4     :class:`BadImageError`        not a 3D scan, NaN voxels, blank, image/label grids differ
5     :class:`BadLabelError`        empty, non-integer, non-binary or missing labels
6     :class:`NoContextError`       no context (example) pairs
7     :class:`BadModelError`        the model is missing or not loadable
8     :class:`OutputError`          an output cannot be written, or would overwrite an input
9     :class:`DeviceError`          the requested device is not available
10    :class:`InsufficientMemoryError`  the request does not fit in memory
130   (KeyboardInterrupt)           interrupted; nothing partial is left behind
====  ============================  =====================================================
"""

from __future__ import annotations

__all__ = [
    "ViclFastError",
    "UsageError",
    "InputError",
    "UnreadableFileError",
    "BadImageError",
    "BadLabelError",
    "NoContextError",
    "BadModelError",
    "OutputError",
    "DeviceError",
    "InsufficientMemoryError",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_OOM",
    "EXIT_INTERRUPTED",
    "exit_code_table",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 10, 130


class ViclFastError(Exception):
    """A problem the user can fix; ``exit_code`` is the process exit status for it.

    ``exit_code`` may be given per instance (``ViclFastError(msg, exit_code=8)``) where a generic
    error maps to a specific status; subclasses fix their own.
    """

    exit_code = EXIT_INTERNAL

    def __init__(self, msg: str = "", exit_code: int | None = None):
        super().__init__(msg)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ViclFastError, ValueError):
    """A bad or missing option or argument (exit code 2, argparse's convention)."""

    exit_code = EXIT_USAGE


class InputError(ViclFastError, ValueError):
    """A problem with the user's input data (exit code 4 unless a subclass says otherwise)."""

    exit_code = 4


class UnreadableFileError(InputError):
    """A file is missing, unreadable, or not in the expected format (exit code 3)."""

    exit_code = 3


class BadImageError(InputError):
    """An image has the wrong dimensionality, or an image/label pair disagrees (exit code 4)."""

    exit_code = 4


class BadLabelError(InputError):
    """A label map is empty, non-binary for a binary task, or non-integer (exit code 5)."""

    exit_code = 5


class NoContextError(InputError):
    """No context (example) pairs were given (exit code 6)."""

    exit_code = 6


class BadModelError(InputError):
    """The model file is missing or not a checkpoint this package can load (exit code 7)."""

    exit_code = 7


class OutputError(InputError):
    """An output path cannot be written, or would overwrite an input (exit code 8)."""

    exit_code = 8


class DeviceError(InputError):
    """The requested device is not available (exit code 9)."""

    exit_code = 9


class InsufficientMemoryError(InputError):
    """The request does not fit the memory of the device, estimated or met while running (exit code 10)."""

    exit_code = EXIT_OOM


def exit_code_table() -> list[tuple[int, str, str]]:
    """``(exit code, class name, first docstring line)`` of every error class, by code (for help texts)."""
    classes = [ViclFastError, UsageError, UnreadableFileError, BadImageError, BadLabelError, NoContextError,
               BadModelError, OutputError, DeviceError, InsufficientMemoryError]
    return sorted((c.exit_code, c.__name__, (c.__doc__ or "").strip().splitlines()[0]) for c in classes)
