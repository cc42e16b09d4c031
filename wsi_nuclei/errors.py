"""User-facing errors and the process exit codes the CLI maps them to.

Every error a user can cause by bad input is a :class:`WsiNucleiError` subclass with a
one-line message; the CLI prints ``wsi-nuclei: error: <message>`` on stderr and exits with
the class's ``exit_code`` (documented in README.md). Anything else is a bug.
"""

from __future__ import annotations


class WsiNucleiError(Exception):
    """Base class: a problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class DeviceError(WsiNucleiError):
    """The requested device (``--device cuda``) is not available here (exit 1)."""

    exit_code = 1


class InputNotFoundError(WsiNucleiError):
    """The input file does not exist (exit 2)."""

    exit_code = 2


class UnsupportedSlideError(WsiNucleiError):
    """No backend can open the file, or it is truncated/corrupt (exit 3)."""

    exit_code = 3


class MissingMppError(WsiNucleiError):
    """The slide has no usable microns-per-pixel and ``--mpp`` was not given (exit 4)."""

    exit_code = 4


class NoTissueError(WsiNucleiError):
    """Tissue detection (and/or ``--regions``) left nothing to process (exit 5)."""

    exit_code = 5


class RegionsFileError(WsiNucleiError):
    """The ``--regions`` GeoJSON is malformed (exit 6)."""

    exit_code = 6


class OutputError(WsiNucleiError):
    """The output directory is not writable, or results exist without ``--overwrite`` (exit 7)."""

    exit_code = 7


class ModelError(WsiNucleiError):
    """Unknown model, missing/mismatching weights file, or a fetch that failed (exit 8)."""

    exit_code = 8


class DatasetError(WsiNucleiError):
    """A training/evaluation dataset is missing or malformed (exit 9)."""

    exit_code = 9


class OwnershipError(RuntimeError):
    """The tile-ownership invariant was violated (a nucleus larger than the halo). A bug or a
    mis-configured halo, not a user input problem."""


def first_line(exc: BaseException) -> str:
    """First line of an exception's message, or its class name when the message is empty (every
    error the user sees is one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
