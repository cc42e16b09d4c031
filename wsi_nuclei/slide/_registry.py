"""The slide backend registry: backend name -> reader opener, and which backends to try for a file.

A leaf module (imports nothing of the package at run time). Each backend module calls
:func:`register_backend` once at import, with its ``priority``: the priority order (not the
import order, which a formatter may change) is the order of :data:`wsi_nuclei.slide.BACKENDS`,
of the CLI's ``--backend`` choices and of the automatic fallback. A new backend is one module
with one ``register_backend`` call, plus its import in ``wsi_nuclei/slide/__init__.py``.

The container of a file is sniffed from its magic bytes (:func:`sniff`); ``"auto"`` tries, in
registration order, the backends that declared that container, and every backend when none did
(an unknown file); both in priority order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._base import Reader

__all__ = [
    "CONTAINERS",
    "auto_order",
    "backend_names",
    "get_opener",
    "register_backend",
    "slide_extensions",
    "sniff",
]

#: Container kinds :func:`sniff` returns (``"other"``: not recognised).
CONTAINERS: tuple[str, ...] = ("tiff", "dicom", "png", "jpeg", "image", "other")


@dataclass(frozen=True)
class _Backend:
    name: str
    opener: Callable[[Path], Reader]
    containers: tuple[str, ...]
    extensions: tuple[str, ...]
    priority: int


_BACKENDS: dict[str, _Backend] = {}


def register_backend(
    name: str,
    opener: Callable[[Path], Reader],
    containers: Iterable[str],
    extensions: Iterable[str] = (),
    *,
    priority: int,
) -> None:
    """Register a slide backend.

    Parameters
    ----------
    name : str
        Backend name (``--backend`` choice, ``Slide.backend``); not ``"auto"``.
    opener : callable
        ``opener(path)`` returns the backend's reader (a :class:`~wsi_nuclei.slide._base.Reader`)
        or raises when it cannot read the file.
    containers : iterable of str
        The :data:`CONTAINERS` the backend is tried for under ``backend="auto"``.
    extensions : iterable of str
        File endings (lower case, with the dot) of the slides the backend reads: a folder or glob
        given to a cohort run takes the files with any registered ending as slides.
    priority : int
        Lower first: where the backend comes in :data:`~wsi_nuclei.slide.BACKENDS` and in the
        automatic fallback.
    """
    kinds = tuple(containers)
    unknown = [k for k in kinds if k not in CONTAINERS]
    if name == "auto" or name in _BACKENDS or unknown:
        raise ValueError(f"cannot register slide backend {name!r} (containers {kinds})")
    _BACKENDS[name] = _Backend(
        name, opener, kinds, tuple(e.lower() for e in extensions), int(priority)
    )


def _ordered() -> list[_Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: (b.priority, b.name))


def backend_names() -> tuple[str, ...]:
    """Registered backend names in priority order."""
    return tuple(b.name for b in _ordered())


def slide_extensions() -> tuple[str, ...]:
    """File endings of all registered backends, each once, in priority order."""
    return tuple(dict.fromkeys(e for b in _ordered() for e in b.extensions))


def get_opener(name: str) -> Callable[[Path], Reader]:
    """The opener registered as ``name`` (:class:`KeyError` when none is)."""
    return _BACKENDS[name].opener


def auto_order(kind: str) -> list[str]:
    """Backends to try, in order, for a file of container ``kind`` (all when none claims it)."""
    return [b.name for b in _ordered() if kind in b.containers] or list(backend_names())


def sniff(path: Path) -> str:
    """Guess the container from magic bytes (and the extension for DICOM without preamble)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "image"
    if path.suffix.lower() in (".dcm", ".dicom"):
        return "dicom"
    return "other"
