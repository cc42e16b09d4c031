"""Backend-agnostic whole-slide reading: OpenSlide, tiffslide, DICOM WSI (pydicom) and plain images.

:func:`open_slide` picks a backend (or honours an explicit one, falling back when it cannot read
the file), resolves the physical pixel size (µm/px) with a documented precedence, and returns a
:class:`Slide` whose API mirrors OpenSlide's names but always hands back ``(H, W, 3)`` uint8 RGB
NumPy arrays with white where the slide has no pixels.

Coordinates
    Every level-0 coordinate is in the frame QuPath uses: relative to the OpenSlide bounds origin
    (``openslide.bounds-x/-y``) when the slide declares one, so ``Slide.dimensions`` is then the
    bounds width/height. :attr:`Slide.offset` holds the origin; it is added internally.
    Pixel ``i`` covers ``[i, i + 1)``; level ``k`` pixel ``j`` covers level-0
    ``[j * d, (j + 1) * d)`` with ``d = level_downsamples[k]``.

Resolution precedence (first plausible value wins; plausible means 0.05..20 µm/px)
    1. the ``mpp`` argument (``user:--mpp``),
    2. OpenSlide ``openslide.mpp-x/-y``,
    3. Aperio ``MPP`` in the image description,
    4. OME-XML ``PhysicalSizeX/Y``,
    5. TIFF ``XResolution/YResolution`` with ``ResolutionUnit`` centimetre or inch,
    6. DICOM ``PixelSpacing`` (shared/per-frame functional groups, or top level),
    7. DICOM ``ImagedVolumeWidth / TotalPixelMatrixColumns`` (nominal),
    8. PNG/JPEG density (dpi), mostly to reject the usual 72/96 dpi defaults.

Layout
    ``_base`` (:class:`BaseSlide`, the reader interface), ``_open`` (:class:`Slide`,
    :func:`open_slide`), ``_mpp`` (the precedence above), ``_integrity`` (truncation check,
    pixel files, fingerprint), ``_registry`` (backend name -> reader, sniff order) and one
    module per backend, imported below in priority order: that order is :data:`BACKENDS`.
"""

from __future__ import annotations

# Backends register themselves on import, each with its priority (BACKENDS order).
from . import _dicom, _image, _openslide, _tiffslide  # noqa: F401, I001
from ._base import BaseSlide, scale_info
from ._integrity import pixel_files
from ._mpp import MPP_RANGE
from ._open import Slide, open_slide
from ._registry import backend_names, slide_extensions

__all__ = [
    "BACKENDS",
    "MPP_RANGE",
    "SLIDE_EXTENSIONS",
    "BaseSlide",
    "Slide",
    "open_slide",
    "pixel_files",
    "scale_info",
]

#: Backend names accepted by :func:`open_slide` (besides ``"auto"``), in priority order.
BACKENDS: tuple[str, ...] = backend_names()
#: File endings (lower case) of the files the backends read, e.g. to list the slides of a folder.
SLIDE_EXTENSIONS: tuple[str, ...] = slide_extensions()
