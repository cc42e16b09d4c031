"""Opening a slide: :func:`open_slide` tries the registered backends, returns a :class:`Slide`."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputNotFoundError, UnsupportedSlideError, WsiNucleiError
from ._base import BaseSlide, Reader
from ._integrity import fingerprint, tiff_structure_problem
from ._mpp import resolve_mpp
from ._registry import auto_order, backend_names, get_opener, sniff

__all__ = ["Slide", "open_slide"]


def _describe_failure(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` of a backend's failure, whitespace collapsed, at most ``limit`` chars."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class Slide(BaseSlide):
    """An open slide file; create it with :func:`open_slide`.

    Besides the :class:`BaseSlide` attributes it has ``backend_errors`` (why the backends tried
    before ``backend`` failed) and ``requested_backend``.
    """

    def __init__(
        self,
        path: Path,
        reader: Reader,
        *,
        mpp: float | None = None,
        require_mpp: bool = True,
        requested_backend: str = "auto",
        backend_errors: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self._reader = reader
        self._closed = False
        self._user_mpp = mpp
        self._require_mpp = require_mpp
        self.requested_backend = requested_backend
        self.backend_errors = dict(backend_errors or {})
        self.backend = reader.name
        self.vendor = reader.vendor
        self.level_dimensions = tuple(reader.level_dimensions)
        self.level_downsamples = tuple(reader.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.offset = tuple(reader.offset)  # type: ignore[assignment]
        self.properties = dict(reader.properties)
        self.mpp_xy, self.mpp_source = resolve_mpp(
            reader.mpp_candidates(), mpp, path.name, require_mpp
        )
        self.mpp = None if self.mpp_xy is None else (self.mpp_xy[0] + self.mpp_xy[1]) / 2.0
        self.fingerprint = fingerprint(path, self.dimensions)

    def _read_inbounds(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._closed:
            raise ValueError("slide is closed")
        try:
            return self._reader.read(level, x, y, w, h)
        except WsiNucleiError:
            raise
        except Exception as exc:  # noqa: BLE001 - never leak a backend traceback
            raise UnsupportedSlideError(
                f"{self.path.name}: cannot decode level {level} region ({x}, {y}, {w}x{h}) "
                f"with {self.backend}: {_describe_failure(exc)}"
            ) from exc

    def close(self) -> None:
        """Close the backend handle (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._reader.close()
            except Exception:  # noqa: BLE001 - closing must not fail
                pass

    def __reduce__(self) -> tuple[Any, ...]:
        # Re-open in the receiving process (dask workers) instead of pickling file handles.
        return (_reopen, (str(self.path), self.backend, self._user_mpp, self._require_mpp))


def _reopen(path: str, backend: str, mpp: float | None, require_mpp: bool) -> Slide:
    return open_slide(path, backend=backend, mpp=mpp, require_mpp=require_mpp)


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: str = "auto",
    mpp: float | None = None,
    require_mpp: bool = True,
) -> Slide:
    """Open a whole-slide image (or a plain image) with the best available backend.

    Parameters
    ----------
    path : str or os.PathLike
        Slide file.
    backend : {"auto", "openslide", "tiffslide", "dicom", "image"}
        Backend to try first. ``"auto"`` orders the backends by file type (TIFF: openslide,
        tiffslide, image; DICOM: openslide, dicom; PNG/JPEG: image; unknown: all). An explicit
        backend that cannot open the file falls back to the automatic order; ``Slide.backend``
        tells which one was used.
    mpp : float, optional
        µm per level-0 pixel; overrides the slide metadata.
    require_mpp : bool
        When False a slide without a usable resolution opens with ``mpp=None`` (for inspection
        commands) instead of raising.

    Returns
    -------
    Slide
        The open slide; use it as a context manager or call :meth:`Slide.close`.

    Raises
    ------
    InputNotFoundError
        ``path`` does not exist.
    UnsupportedSlideError
        No backend can read the file, or it is truncated/corrupt.
    MissingMppError
        No plausible resolution (0.05..20 µm/px) in the metadata and ``mpp`` not given, or an
        implausible ``mpp``.
    """
    p = Path(path)
    names = backend_names()
    if backend != "auto" and backend not in names:
        raise WsiNucleiError(
            f"unknown slide backend {backend!r} (choose from auto, {', '.join(names)})"
        )
    if not p.exists():
        raise InputNotFoundError(f"input slide not found: {p}")
    if p.is_dir():
        raise UnsupportedSlideError(f"{p} is a directory, not a slide file")
    try:
        size = p.stat().st_size
        kind = sniff(p)
    except OSError as exc:
        raise UnsupportedSlideError(f"cannot read {p}: {_describe_failure(exc)}") from exc
    if size == 0:
        raise UnsupportedSlideError(f"{p.name} is empty (0 bytes)")
    if kind == "tiff":
        try:
            problem = tiff_structure_problem(p)
        except (OSError, struct.error) as exc:
            problem = _describe_failure(exc)
        if problem:
            raise UnsupportedSlideError(f"{p.name} is truncated or corrupt: {problem}")
    order = auto_order(kind)
    if backend != "auto":
        order = [backend] + [b for b in order if b != backend]
    errors: dict[str, str] = {}
    for name in order:
        reader: Reader | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = get_opener(name)(p)
                reader.smoke_test()
        except Exception as exc:  # noqa: BLE001 - a failing backend means "try the next one"
            errors[name] = _describe_failure(exc)
            if reader is not None:
                try:
                    reader.close()
                except Exception:  # noqa: BLE001
                    pass
            continue
        try:
            return Slide(
                p,
                reader,
                mpp=mpp,
                require_mpp=require_mpp,
                requested_backend=backend,
                backend_errors=errors,
            )
        except BaseException:
            reader.close()
            raise
    detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
    raise UnsupportedSlideError(f"cannot open {p.name}: no backend can read it ({detail})")
