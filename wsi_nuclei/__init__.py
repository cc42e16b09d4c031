"""wsi-nuclei: whole-slide nucleus segmentation and classification (PanNuke schema)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
