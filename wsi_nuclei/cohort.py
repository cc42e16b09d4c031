"""Many slides in one command: ``wsi-nuclei run a.svs b.ndpi``, ``run slides/``, ``run 'slides/*.svs'``.

::

    expand_inputs     command-line arguments -> the slide list (folders listed, globs expanded,
                      each slide once), and whether the run is a cohort run
    output_names      one output folder name per slide, the slide stem; stems that collide
                      (case-insensitively) get ``-1``, ``-2``, ... in the order of their paths
    run_cohort        every slide into ``<out>/<name>/`` with one model load and one Dask
                      client, a failure reported in one line and the others continued, a
                      finished slide skipped on a rerun, ``<out>/cohort.csv`` at the end

A cohort run is one with more than one slide, or with a folder or a glob pattern among the
inputs (even if it holds one slide), so that a script's output layout does not depend on how
many slides a folder happens to hold. One explicit slide file keeps the single-slide layout.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InputNotFoundError, WsiNucleiError, first_line
from .slide import SLIDE_EXTENSIONS

__all__ = ["CohortResult", "expand_inputs", "output_names", "run_cohort", "COHORT_TABLE"]

#: Name of the cohort table a cohort run writes under ``--out``.
COHORT_TABLE = "cohort.csv"
_GLOB_CHARS = set("*?[")


def _is_slide_name(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_EXTENSIONS and not path.name.startswith(".")


def _mirax_data_folder(path: Path) -> bool:
    """True for the data folder of a MIRAX slide (``x/`` beside ``x.mrxs``): part of that slide."""
    return path.is_dir() and any(
        path.with_name(path.name + ext).is_file() for ext in (".mrxs", ".MRXS")
    )


def _list_folder(folder: Path) -> list[Path]:
    """Slides directly inside ``folder`` (not recursive), by name."""
    found = []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if _is_slide_name(p) and not _mirax_data_folder(p):
            found.append(p)
    return found


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], bool]:
    """The slides named by command-line ``inputs``, and whether this is a cohort run.

    Parameters
    ----------
    inputs : sequence of str
        Slide files, folders of slides (listed, not recursively; entries whose name ends in one
        of :data:`wsi_nuclei.slide.SLIDE_EXTENSIONS`; a MIRAX ``.mrxs`` and its data folder count once) and glob
        patterns (``*``, ``?``, ``[...]``; expanded here, so they may be quoted; ``**`` recurses;
        matches are kept when their name ends in a slide extension). A folder whose own name
        ends in a slide extension is taken as a slide (and refused by the reader).

    Returns
    -------
    slides : list of pathlib.Path
        Each slide once (the same file given twice, by any path, is run once), in the order
        given; a folder's or pattern's matches sorted by name.
    cohort : bool
        True when there is more than one slide or a folder or pattern was given.

    Raises
    ------
    InputNotFoundError
        A path that does not exist, or a folder or pattern without slides (exit code 2).
    """
    slides: list[Path] = []
    cohort = len(inputs) > 1
    for text in inputs:
        p = Path(text)
        if p.exists():
            if p.is_dir() and not _is_slide_name(p):
                cohort = True
                found = _list_folder(p)
                if not found:
                    raise InputNotFoundError(
                        f"{p}: no slides in this folder (looked for {', '.join(SLIDE_EXTENSIONS)})"
                    )
                slides += found
            else:
                slides.append(p)
        elif _GLOB_CHARS & set(text):
            cohort = True
            found = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            found = [m for m in found if _is_slide_name(m) and not _mirax_data_folder(m)]
            if not found:
                raise InputNotFoundError(f"{text}: no slide matches this pattern")
            slides += found
        else:
            raise InputNotFoundError(f"{text}: no such file")
    unique: list[Path] = []
    seen: set[Path] = set()
    for s in slides:
        key = s.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique, cohort


def output_names(slides: Sequence[Path]) -> tuple[list[str], list[str]]:
    """One output folder name per slide, and a note for every group of colliding names.

    Parameters
    ----------
    slides : sequence of pathlib.Path
        Distinct slides.

    Returns
    -------
    names : list of str
        The slide stem (``x`` for ``x.svs`` and ``x.ome.tiff``); slides whose stems are equal
        ignoring case get ``<stem>-1``, ``<stem>-2``, ... numbered in the order of their
        absolute paths, so the same slides always get the same folders.
    notes : list of str
        One line per group of colliding stems, naming which slide went where.
    """
    from .pipeline import default_out_dir

    stems = [default_out_dir(s).name for s in slides]
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem.lower(), []).append(i)
    names = list(stems)
    taken = {s.lower() for s in stems}
    notes = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda i: str(slides[i].resolve()))
        k = 0
        for i in members:
            k += 1
            while f"{stems[i]}-{k}".lower() in taken:
                k += 1
            names[i] = f"{stems[i]}-{k}"
            taken.add(names[i].lower())
        where = ", ".join(f"{slides[i]} -> {names[i]}/" for i in members)
        notes.append(f"{len(members)} slides share the name {stems[members[0]]!r}: {where}")
    return names, notes


@dataclass
class CohortResult:
    """What :func:`run_cohort` did."""

    done: list[Path] = field(default_factory=list)  # run folders finished now
    skipped: list[Path] = field(default_factory=list)  # run folders finished by an earlier run
    failed: list[tuple[Path, str, int]] = field(default_factory=list)  # (slide, message, exit code)
    table: Path | None = None  # the cohort CSV, when at least one slide has results
    duplicates: list[str] = field(default_factory=list)  # warnings from the cohort table
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every slide has results; else the failures' exit code when they share one, else 1."""
        codes = {c for _, _, c in self.failed}
        if not codes:
            return 0
        return codes.pop() if len(codes) == 1 else 1


def _finished_earlier(run_dir: Path, slide: Path, cfg: Any) -> bool:
    """True when ``run_dir`` holds a finished run of this very slide (fingerprint) with the same
    model, weights, test-time augmentation, precision and tissue mode: a rerun of the cohort
    skips it."""
    manifest_path = run_dir / "run.json"
    if cfg.overwrite or not manifest_path.is_file() or (run_dir / ".work").exists():
        return False
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    from .models import (
        default_model_name,
        find_weights,
        get_spec,
        resolve_device,
        resolve_precision,
        sha256_file,
    )
    from .slide import open_slide

    spec = get_spec(cfg.model or default_model_name())
    weights = find_weights(spec, cfg.weights)
    sha = (
        spec.sha256
        if (spec.sha256 and cfg.weights is None)
        else (sha256_file(weights) if weights else None)
    )
    with open_slide(slide, backend=cfg.backend, mpp=cfg.mpp) as s:
        fingerprint = s.fingerprint
    model = m.get("model") or {}
    source = "tissue detection" if cfg.tissue == "auto" else "whole slide"
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device), spec)
    wanted = [fingerprint, spec.name, sha, bool(cfg.tta), precision, source, bool(cfg.anndata)]
    found = [
        m.get("fingerprint"),
        model.get("name"),
        model.get("sha256"),
        bool(model.get("tta")),
        model.get("precision"),
        (m.get("regions") or {}).get("source"),
        (run_dir / "nuclei.h5ad").is_file(),
    ]
    return wanted == found and (run_dir / "summary.json").is_file()


def run_cohort(
    slides: Sequence[Path],
    out_root: str | Path,
    base: Any,
    *,
    names: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    report: Callable[[Any], None] | None = None,
) -> CohortResult:
    """Run the pipeline on every slide, each into ``out_root/<name>/``, and write the cohort table.

    The model is loaded once (the engine caches it per process, and one Dask client, hence one
    set of worker processes, serves every slide). A slide that fails is reported through
    ``log`` in one line and the next one starts; a slide whose folder already holds a finished
    run of the same slide and model is skipped (so rerunning the command resumes the cohort:
    an interrupted slide continues from its finished blocks). At the end
    ``out_root/cohort.csv`` is written as ``wsi-nuclei summarize`` would write it, from the
    folders of every slide that has results (sorted by folder name, as ``summarize <out_root>``
    finds them).

    Parameters
    ----------
    slides : sequence of pathlib.Path
        Distinct slide files (see :func:`expand_inputs`).
    out_root : str or pathlib.Path
        Folder that receives one run folder per slide and ``cohort.csv``.
    base : wsi_nuclei.pipeline.RunConfig
        Options shared by every slide (``slide``, ``out`` and ``client`` are set per slide).
    names : sequence of str, optional
        Output folder names (default: :func:`output_names`; its notes go to ``log``).
    log : callable, optional
        Receives each message line (failures start with ``wsi-nuclei: error:``); default stderr.
    report : callable, optional
        Called with each slide's :class:`~wsi_nuclei.pipeline.RunResult` (e.g. to print it).

    Returns
    -------
    CohortResult
        Folders done, skipped and the failures; ``exit_code`` for the command.

    Raises
    ------
    KeyboardInterrupt
        Passed on at once (a rerun resumes).
    OutputError
        ``cohort.csv`` cannot be written.
    """
    from .pipeline import resolve_threads, run
    from .pipeline._stages import _client
    from .summary import duplicate_slides, summarize_runs

    t0 = time.perf_counter()
    if log is None:

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

    out_root = Path(out_root)
    if names is None:
        names, notes = output_names(slides)
        for n in notes:
            log(f"wsi-nuclei: note: {n}")
    res = CohortResult()
    client = None
    try:
        for i, (slide, name) in enumerate(zip(slides, names), 1):
            run_dir = out_root / name
            head = f"[{i}/{len(slides)}] {slide}"
            try:
                if _finished_earlier(run_dir, slide, base):
                    res.skipped.append(run_dir)
                    if not base.quiet:
                        log(
                            f"{head}: finished earlier in {run_dir}/, skipped (--overwrite to redo)"
                        )
                    continue
                if not base.quiet:
                    log(f"{head} -> {run_dir}/")
                if client is None and (base.scheduler or base.workers > 1):
                    # worker processes or a cluster serve every slide (models loaded once);
                    # in-process threads need no client (the model cache is per process)
                    client = _client(
                        base.scheduler, base.workers, resolve_threads(base.threads, base.workers)
                    )
                result = run(replace(base, slide=str(slide), out=str(run_dir), client=client))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the cohort
                code = getattr(exc, "exit_code", 1)
                what = (
                    "" if isinstance(exc, WsiNucleiError) else f"unexpected {type(exc).__name__}: "
                )
                log(f"wsi-nuclei: error: {slide}: {what}{first_line(exc)}")
                res.failed.append((slide, first_line(exc), int(code)))
                # the engine cancels a failed slide's tasks, so the client (and the model its
                # workers loaded) serves the next slide; one that broke down is replaced
                if client is not None and getattr(client, "status", "running") != "running":
                    _close(client)
                    client = None
                continue
            res.done.append(run_dir)
            if report is not None:
                report(result)
    finally:
        if client is not None:
            _close(client)
    ok = set(res.done) | set(res.skipped)
    # in the order `wsi-nuclei summarize <out>` finds them, so that both write the same table
    finished = sorted(ok, key=lambda p: p.parts)
    if finished:
        res.table = out_root / COHORT_TABLE
        summarize_runs(finished, res.table)
        res.duplicates = duplicate_slides(finished)
        for w in res.duplicates:
            log(f"wsi-nuclei: warning: {w}")
    res.seconds = time.perf_counter() - t0
    return res


def _close(client: Any) -> None:
    try:
        client.close(timeout=30)
    except Exception:  # noqa: BLE001 - closing after an error: the error is what the user must see
        pass
