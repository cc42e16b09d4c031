"""Command-line interface: ``wsi-nuclei run | report | overlay | demo | summarize | models | train | evaluate``.

Every user error ends with one line ``wsi-nuclei: error: ...`` on stderr and the exit code of
its :class:`~wsi_nuclei.errors.WsiNucleiError` class (see ``wsi-nuclei --help``).

Modules: ``_main`` (:func:`build_parser`, :func:`main`), ``_args`` (argument types, the run
options), ``_commands`` (one function per subcommand).
"""

from __future__ import annotations

from ._args import EXIT_CODES, INTERNAL_ERROR
from ._main import build_parser, main

__all__ = ["EXIT_CODES", "INTERNAL_ERROR", "build_parser", "main"]
