"""Engine benchmarks: per-stage time, tiles/s and peak resident memory.

Each case runs in a fresh subprocess (so peak RSS is that of the case alone) and prints one
JSON line; the parent prints a Markdown table. Cases:

* ``overhead``: the ``null`` model (no network, a fixed lattice of disc nuclei) on a
  synthetic pyramidal TIFF written to a temporary folder: read + blend + blocks + seams +
  measure + write, i.e. the engine without the model.
* ``memory``: the ``null`` model on procedural ``SyntheticSlide`` objects of growing size
  (default 25k, 50k, 100k px square, ~10 % tissue): peak RSS must stay flat.
* ``cmu``: CMU-1-Small-Region.svs (20x) end to end with a given model (default: the default
  model), from ``../shared/data/wsi``.

Every case also reports the child process's CPU time (user / system, and the kernel's share of
it) and its minor page faults (``getrusage`` over the whole child, as ``/usr/bin/time -v``
counts them): on a machine shared with other jobs these vary much less than the wall time. ``--infer-chunk N`` passes
``RunConfig.infer_chunk`` (patches per network call) to compare settings.

Usage::

    python benchmarks/bench_engine.py overhead memory cmu [--model NAME] [--sizes 25000 50000 100000]
    python benchmarks/bench_engine.py cmu [--infer-chunk 16]      # memory / kernel-time figures of the CMU run
    python benchmarks/bench_engine.py cmu --precision fp32 [--no-fuse]   # float32; without BN folding
    python benchmarks/bench_engine.py overhead --repeat 5 --against /tmp/old   # medians, alternating
                                           # with another commit's tree (git archive C | tar -x -C /tmp/old)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(
    case: str,
    arg: str,
    model: str | None,
    threads: int,
    infer_chunk: int | None = None,
    workers: int = 1,
    precision: str = "auto",
    no_fuse: bool = False,
) -> dict:
    import torch

    torch.set_num_threads(threads)
    from wsi_nuclei.pipeline import RunConfig, run

    tmp = Path(tempfile.mkdtemp(prefix="wsi-nuclei-bench-"))
    info: dict = {"case": case, "arg": arg}
    if case == "overhead":
        from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff

        size = int(arg)
        rgb, _, _ = make_nuclei_image(size, size, seed=1)
        slide = tmp / "synthetic.svs"
        write_pyramidal_tiff(slide, rgb, mpp=0.25)
        del rgb
        cfg = RunConfig(slide=slide, out=tmp / "out", model="null", tissue="none", quiet=True)
    elif case == "memory":
        from wsi_nuclei.demo import SyntheticSlide

        size = int(arg)
        cfg = RunConfig(
            slide=SyntheticSlide(size, size, mpp=0.25, tissue_fraction=0.1, seed=0),
            out=tmp / "out",
            model="null",
            quiet=True,
        )
    elif case == "cmu":
        cfg = RunConfig(slide=arg, out=tmp / "out", model=model, quiet=True, precision=precision)
        if no_fuse:  # the registry's spec without batch-norm folding, for this process only
            import dataclasses

            from wsi_nuclei.models import _registry, default_model_name

            name = model or default_model_name()
            spec = _registry.get_spec(name)
            _registry._REGISTRY[name] = dataclasses.replace(spec, fuse_batchnorm=False)
    else:
        raise SystemExit(f"unknown case {case}")
    cfg.infer_chunk = infer_chunk
    cfg.workers = workers
    if workers > 1:  # the cores shared out between the worker processes
        cfg.threads = max(1, threads // workers)
    t = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_SELF)
    rss_mb = ru.ru_maxrss / 1024
    user, system = (
        ru.ru_utime,
        ru.ru_stime,
    )  # the whole child process (imports too), as /usr/bin/time counts
    info.update(
        {
            "model": res.manifest["model"]["name"],
            "patches_total": res.patches_total,
            "patches_run": res.patches_run,
            "passes_per_pixel": res.manifest["qc"]["passes_per_pixel"],
            "blocks": res.manifest["qc"]["blocks_processed"],
            "n_nuclei": res.n_nuclei,
            "wall_s": round(wall, 2),
            "patches_per_s": round(res.patches_run / wall, 1),
            "patches_per_s_execute": round(res.patches_run / max(1e-9, res.seconds["execute"]), 1),
            "peak_rss_mb": round(rss_mb),
            "cpu_user_s": round(user, 1),
            "cpu_system_s": round(system, 1),
            "kernel_share": round(system / max(1e-9, user + system), 3),
            "minor_faults": ru.ru_minflt,
            "infer_chunk": res.manifest["tiling"].get("infer_chunk"),
            "precision": res.manifest["model"].get("precision"),
            "fused_batchnorm": not no_fuse,
            "seconds": {k: round(v, 2) for k, v in res.seconds.items()},
            "qc_seconds": {
                k: res.manifest["qc"][f"seconds_{k}_task_sum"] for k in ("read", "infer", "post")
            },
            "slide_px": list(res.manifest["dimensions"]),
        }
    )
    return info


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("cases", nargs="*", default=["overhead", "memory", "cmu"])
    p.add_argument(
        "--model", default=None, help="model for the cmu case (default: the default model)"
    )
    p.add_argument(
        "--sizes",
        nargs="*",
        type=int,
        default=[25_000, 50_000, 100_000],
        help="SyntheticSlide sizes for the memory case",
    )
    p.add_argument(
        "--overhead-size",
        type=int,
        default=6144,
        help="synthetic TIFF size for the overhead case (px)",
    )
    p.add_argument(
        "--cmu", default=str(REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs")
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--infer-chunk",
        type=int,
        default=None,
        help="patches per network call (default: the run's default)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local worker processes (RunConfig.workers; 1: in-process threads)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="network arithmetic of the cmu case, as 'wsi-nuclei run --precision' (default auto)",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="cmu case: keep the batch normalisations as separate layers (the spec's "
        "fuse_batchnorm off), to measure what folding them gains end to end",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each case N times (fresh processes) and print the medians: on a shared host one "
        "run's wall time can vary by 1.5x",
    )
    p.add_argument(
        "--against",
        metavar="DIR",
        help="a source tree of another commit (e.g. from 'git archive COMMIT | tar -x -C DIR'): "
        "each repeat runs it and this tree alternately, and the medians of both are printed",
    )
    p.add_argument("--json", help="append results (JSON lines) to this file")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(
            "RESULT "
            + json.dumps(
                _child(
                    args._child[0],
                    args._child[1],
                    args.model,
                    args.threads,
                    args.infer_chunk,
                    args.workers,
                    args.precision,
                    args.no_fuse,
                )
            ),
            flush=True,
        )
        return 0
    jobs = []
    for case in args.cases:
        if case == "overhead":
            jobs.append(("overhead", str(args.overhead_size)))
        elif case == "memory":
            jobs += [("memory", str(s)) for s in args.sizes]
        elif case == "cmu":
            if not Path(args.cmu).is_file():
                print(f"skipping cmu: {args.cmu} not found", file=sys.stderr)
                continue
            jobs.append(("cmu", args.cmu))
    trees = [("this", str(REPO))] + ([("against", args.against)] if args.against else [])
    if args.against and not (Path(args.against) / "wsi_nuclei").is_dir():
        print(f"--against {args.against}: no wsi_nuclei package there", file=sys.stderr)
        return 2
    results = []
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for case, arg in jobs:
        cmd = [sys.executable, __file__, "--_child", case, arg, "--threads", str(args.threads)] + (
            ["--model", args.model] if args.model else []
        )
        cmd += ["--infer-chunk", str(args.infer_chunk)] if args.infer_chunk else []
        cmd += ["--workers", str(args.workers), "--precision", args.precision]
        cmd += ["--no-fuse"] if args.no_fuse else []
        for i in range(max(1, args.repeat)):
            for tree, src in trees[:: 1 if i % 2 == 0 else -1]:  # ABBA: neither always first
                env = {**os.environ, "PYTHONPATH": src}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next(
                    (ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None
                )
                if out.returncode or line is None:
                    print(
                        f"case {case} {arg} ({tree}) failed:\n{out.stderr[-2000:]}", file=sys.stderr
                    )
                    return 1
                r = {**json.loads(line[7:]), "tree": tree, "source": src}
                runs.setdefault((case, arg, tree), []).append(r)
                print(json.dumps(r), file=sys.stderr)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({**r, "machine": _machine()}) + "\n")
        results += [_median_run(runs[(case, arg, tree)]) for tree, _ in trees]
    print(f"\nmachine: {_machine()}\n")
    if args.repeat > 1 or args.against:
        print(
            f"medians of {max(1, args.repeat)} runs per tree"
            + (f" (alternating; 'against' = {args.against})" if args.against else "")
            + "\n"
        )
    print(
        "| case | slide px | model | patches run / total | passes/px | nuclei | wall s | patches/s | execute patches/s | read s* | infer s* "
        "| post s* | stitch s | write s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        w = s.get("write_geojson", 0) + s.get("write_parquet", 0) + s.get("summaries", 0)
        q = r.get("qc_seconds", {})
        label = r["case"] + ("" if not args.against else f" ({r['tree']})")
        print(
            f"| {label} | {r['slide_px'][0]}x{r['slide_px'][1]} | {r['model']} | {r['patches_run']} / {r['patches_total']} | "
            f"{r['passes_per_pixel']} | {r['n_nuclei']} | {r['wall_s']} | {r['patches_per_s']} | "
            f"{r['patches_per_s_execute']} | {q.get('read', 0)} | "
            f"{q.get('infer', 0)} | {q.get('post', 0)} | {s.get('stitch', 0)} | {round(w, 2)} | {r['peak_rss_mb']} |"
        )
    print("\n*: summed task time over the worker threads (they overlap), not wall time.")
    print(
        "\n| case | slide px | infer chunk | wall s | CPU user s | CPU system s | kernel share | minor page faults | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        label = r["case"] + ("" if not args.against else f" ({r['tree']})")
        print(
            f"| {label} | {r['slide_px'][0]}x{r['slide_px'][1]} | {r['infer_chunk']} | {r['wall_s']} | {r['cpu_user_s']} | "
            f"{r['cpu_system_s']} | {100 * r['kernel_share']:.1f} % | {r['minor_faults'] / 1e6:.2f} M | {r['peak_rss_mb']} |"
        )
    return 0


_MEDIAN_KEYS = (
    "wall_s",
    "patches_per_s",
    "patches_per_s_execute",
    "peak_rss_mb",
    "cpu_user_s",
    "cpu_system_s",
    "kernel_share",
    "minor_faults",
)


def _median_run(rs: list[dict]) -> dict:
    """One result whose figures are the medians over repeated runs (the rest from the first)."""
    import statistics

    out = dict(rs[0])
    for k in _MEDIAN_KEYS:
        out[k] = statistics.median(r[k] for r in rs)
    for group in ("seconds", "qc_seconds"):
        out[group] = {k: round(statistics.median(r[group][k] for r in rs), 2) for k in rs[0][group]}
    out["n_runs"] = len(rs)
    return out


def _machine() -> str:
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, no GPU"


if __name__ == "__main__":
    sys.exit(main())
