"""wsi-nuclei: whole-slide nucleus segmentation and classification (PanNuke schema).

The public API; each name loads its module on first use (``import wsi_nuclei`` stays cheap)::

    import wsi_nuclei as wn

    result = wn.run(wn.RunConfig(slide="slide.svs", out="out/"))    # the whole pipeline
    slide = wn.open_slide("slide.svs")                               # read
    tissue = wn.detect_tissue_on_slide(slide)                        # tissue
    regions = wn.load_regions("annotations.geojson")                 # QuPath annotations
    model = wn.load_model(wn.default_model_name())                   # a registered model
    nuclei = wn.segment_image(model, rgb)     # an RGB array at the model's resolution
    wn.write_report("out/")                                          # visual QC again

The stages, one package or module each, in the order data flows through them:
:mod:`~wsi_nuclei.slide` -> :mod:`~wsi_nuclei.tissue` / :mod:`~wsi_nuclei.regions` ->
:mod:`~wsi_nuclei.tiling` / :mod:`~wsi_nuclei.engine` / :mod:`~wsi_nuclei.models` ->
:mod:`~wsi_nuclei.postprocess` -> :mod:`~wsi_nuclei.stitching` -> :mod:`~wsi_nuclei.export` ->
:mod:`~wsi_nuclei.summary` / :mod:`~wsi_nuclei.report`; :mod:`~wsi_nuclei.pipeline` wires them
(see ``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "RunConfig": "pipeline",
    "RunResult": "pipeline",
    "run": "pipeline",
    "run_cohort": "cohort",
    "open_slide": "slide",
    "Slide": "slide",
    "detect_tissue_on_slide": "tissue",
    "Region": "regions",
    "load_regions": "regions",
    "ModelSpec": "models",
    "default_model_name": "models",
    "get_spec": "models",
    "list_models": "models",
    "load_model": "models",
    "register_model": "models",
    "segment_image": "inference",
    "check_qupath_geojson": "export",
    "summarize_runs": "summary",
    "write_report": "report",
    "render_overlay": "report",
    "WsiNucleiError": "errors",
}

__all__ = [
    "__version__",
    "ModelSpec",
    "Region",
    "RunConfig",
    "RunResult",
    "Slide",
    "WsiNucleiError",
    "check_qupath_geojson",
    "default_model_name",
    "detect_tissue_on_slide",
    "get_spec",
    "list_models",
    "load_model",
    "load_regions",
    "open_slide",
    "register_model",
    "render_overlay",
    "run",
    "run_cohort",
    "segment_image",
    "summarize_runs",
    "write_report",
]

if TYPE_CHECKING:
    from .cohort import run_cohort
    from .errors import WsiNucleiError
    from .export import check_qupath_geojson
    from .inference import segment_image
    from .models import (
        ModelSpec,
        default_model_name,
        get_spec,
        list_models,
        load_model,
        register_model,
    )
    from .pipeline import RunConfig, RunResult, run
    from .regions import Region, load_regions
    from .report import render_overlay, write_report
    from .slide import Slide, open_slide
    from .summary import summarize_runs
    from .tissue import detect_tissue_on_slide


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
