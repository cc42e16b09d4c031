"""wsi-nuclei against TIAToolbox on the same HoVer-Net "fast" PanNuke network, side by side.

Usage::

    python benchmarks/bench_peers.py [--slide PATH] [--crop X,Y,W,H] [--repeats N] [--work DIR] [--json OUT]

Both tools run the same network with the same weights: a seeded random state dict in the
official HoVer-Net "fast" PanNuke layout (``wsi_nuclei.models.hovernet.checkpoint.official_state_dict_layout``;
TIAToolbox's ``hovernet_fast-pannuke`` architecture has exactly these keys and shapes, checked
here), saved once under ``--work`` and loaded by ``wsi-nuclei run --model hovernet-pannuke
--weights FILE`` and by ``NucleusInstanceSegmentor("hovernet_fast-pannuke", weights=FILE)``.

1. The raw network outputs of both are compared on one 256 x 256 patch of the slide (max abs
   difference of the NP/HV/TP logits, of the NP probability and HV maps their ``infer`` calls
   return, and the agreement of the type argmax).
2. Each tool processes the same region at 0.25 um/px (the model's resolution: CMU-1 is 0.499
   um/px, so both upsample about 2x), ``--repeats`` times, alternating, each run in a fresh
   subprocess. Measured per run: wall time, peak RSS (the child's ``getrusage`` maximum via
   ``os.wait4``, and the sum over its process tree sampled every 0.2 s with psutil; the weights
   and step 1 run in a child of their own, because Linux carries a parent's high-water mark
   across fork and exec into every child's maximum: the measuring process loads no network and
   stays near 50 MB, recorded per run as ``parent_peak_rss_mb``), network
   patches (wsi-nuclei: run.json; TIAToolbox: a forward hook on its network counting the
   batch rows it is called with) and output nuclei (meaningless with random weights; for the
   record).
3. A table of the medians and the ratios wsi-nuclei / TIAToolbox; ``--json`` writes everything.

The region: the whole slide with each tool's own tissue detection (default), or with ``--crop
X,Y,W,H`` a level-0 rectangle written once as a tiled TIFF (0.499 um/px in its resolution tags)
that both process whole, without tissue detection (``--tissue none`` / ``auto_get_mask=False``),
so both cover exactly the same pixels.

The random weights. A He-normal network (``torch.manual_seed(--seed)``) whose batch norms are
then calibrated on two patches of the slide (one forward pass in training mode with cumulative
statistics, so every layer is normalised instead of growing to logits in the hundreds); the
NP head's foreground bias is set so that ``--fg`` (default 30 %) of the calibration pixels are
nucleus; the HV branch gets the NP branch's weights with both channels the foreground margin at
unit spread (random HV maps are pixel noise, in which TIAToolbox's Sobel markers find no nucleus
at all; blob-shaped HV maps give markers inside the foreground in both tools); the type head's
background logit is lowered by 100 so every instance gets one of the 5 classes. Post-processing
then does real work in both tools.

TIAToolbox imports torchvision, which has no CPU build here (the PyPI wheel is the CUDA one
and fails to import on the CPU build of torch). With ``--torchvision-shim auto`` (default: only
when ``import torchvision`` fails) the TIAToolbox child installs an import shim: a finder that
answers ``torchvision`` and its submodules with empty modules whose every attribute is an inert
placeholder class (constructible, but calling an instance raises). It only satisfies imports
made at module load time (timm's ``FrozenBatchNorm2d``, torchvision ``transforms`` built at
import by unrelated models, ``models.resnet50`` in a dictionary...); nothing on the
NucleusInstanceSegmentor / HoVerNet path calls torchvision, which a call into a placeholder
would show by raising. The names it was asked for are recorded in the JSON
(``tiatoolbox.torchvision_shim``). The measured code (patch extraction, the network,
post-processing, merging, writing) is TIAToolbox's own.

Installs nothing: without TIAToolbox (``pip install -e '.[bench]'``, see docs/benchmarks.md)
it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

DEFAULT_SLIDE = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "wsi"
    / "CMU-1-Small-Region.svs"
)
MODEL_MPP = 0.25
TIA_MODEL = "hovernet_fast-pannuke"
TOOLS = ("wsi-nuclei", "tiatoolbox")
KEYS = ("wall_s", "cpu_s", "peak_rss_mb", "tree_peak_rss_mb", "patches", "nuclei")


# --------------------------------------------------------------------------------------
# torchvision import shim (TIAToolbox child only)
# --------------------------------------------------------------------------------------
SHIM_REQUESTS: list[str] = []


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(qualname: str) -> type:
    SHIM_REQUESTS.append(qualname)

    def _init(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"torchvision shim: {qualname} was called (the benchmark's shim only satisfies imports)"
        )

    module, _, name = qualname.rpartition(".")
    return _PlaceholderMeta(
        name,
        (),
        {"__init__": _init, "__call__": _refuse, "__qualname__": qualname, "__module__": module},
    )


class _ShimModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        value = sys.modules.get(full) or _placeholder(full)
        setattr(self, name, value)
        return value


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        SHIM_REQUESTS.append(f"{spec.name} (module)")
        module = _ShimModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0+benchmark-shim"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install_torchvision_shim(mode: str = "auto") -> bool:
    """Install the shim (``mode`` ``on``, or ``auto`` when torchvision does not import); return whether it is in place."""
    if mode == "off":
        return False
    if mode == "auto":
        try:
            import torchvision  # noqa: F401

            return False
        except Exception:  # noqa: BLE001 - a CUDA wheel on CPU torch raises RuntimeError, not ImportError
            for name in [
                m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")
            ]:
                del sys.modules[name]
    sys.meta_path.insert(0, _ShimFinder())
    return True


def tiatoolbox_available() -> str | None:
    """None when TIAToolbox can be found, else the reason (one line)."""
    import importlib.util

    if importlib.util.find_spec("tiatoolbox") is None:
        return "tiatoolbox is not installed (pip install -e '.[bench]' in a separate venv; see docs/benchmarks.md)"
    return None


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
def _calibration_patches(slide: str, n: int = 2, size: int = 256):
    """``n`` RGB patches (N, size, size, 3) uint8 from the middle of the slide's level 0."""
    import numpy as np

    from wsi_nuclei.slide import open_slide

    with open_slide(slide) as s:
        w, h = s.dimensions
        out = []
        for i in range(n):
            x = min(max(0, w // 2 + (i - n // 2) * size), w - size)
            out.append(
                np.asarray(s.read_region((x, max(0, h // 2 - size // 2)), 0, (size, size)))[..., :3]
            )
    return np.stack(out).astype(np.uint8)


def make_state_dict(seed: int = 0, patches=None, fg: float = 0.3) -> OrderedDict:
    """A seeded random HoVer-Net "fast" PanNuke state dict in the official layout.

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the He-normal initialisation.
    patches : ndarray (N, H, W, 3) uint8, optional
        Calibration images: the batch norms take their statistics from one training-mode
        pass over them, the HV head is scaled to unit spread and the NP head's bias set so
        that a fraction ``fg`` of their pixels is foreground. Without them the He-normal
        network is returned as it is (unit batch norms).
    fg : float
        Foreground fraction on the calibration patches.

    Returns
    -------
    OrderedDict
        The official keys in module order, plus the batch norms' ``num_batches_tracked``
        counters (TIAToolbox's strict loader wants them; wsi-nuclei's loader accepts them).
    """
    import torch

    from wsi_nuclei.models.hovernet.net import build_hovernet_fast

    torch.manual_seed(seed)
    net = build_hovernet_fast()
    if patches is not None:
        x = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: after one pass, the batch's statistics
        net.train()
        with torch.no_grad():
            net(x)
        net.eval()
        with torch.no_grad():
            out = net(x)
            diff = out["np"][:, 1] - out["np"][:, 0]
            threshold = torch.quantile(diff.flatten().float(), 1.0 - fg)
            np_head = net.decoder["np"].u0.conv
            np_head.bias[1] -= threshold  # softmax(np)[1] > 0.5 exactly where diff > threshold
            # HV: random HV maps are pixel noise, in which TIAToolbox's Sobel-based markers find
            # no nucleus at all. Give the HV branch the NP branch's weights, its two channels both
            # the foreground margin scaled to unit spread: a landscape of blobs, whose Sobel
            # gradients make markers inside the foreground in both tools' post-processing.
            net.decoder["hv"].load_state_dict(net.decoder["np"].state_dict())
            hv_head = net.decoder["hv"].u0.conv
            margin_w = np_head.weight[1] - np_head.weight[0]
            margin_b = np_head.bias[1] - np_head.bias[0]
            scale = (diff - threshold).std()
            hv_head.weight.copy_(torch.stack([margin_w, margin_w]) / scale)
            hv_head.bias.copy_(torch.stack([margin_b, margin_b]) / scale)
            # TP: no background wins the type argmax, so every instance gets one of the 5 classes
            net.decoder["tp"].u0.conv.bias[0] -= 100.0
    sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in net.state_dict().items())
    for k in list(sd):
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros((), dtype=torch.long)
    return sd


def _weights_path(work: Path, seed: int, fg: float) -> Path:
    return work / f"hovernet-fast-random-v2-seed{seed}-fg{round(fg * 100)}.pth"


def weights_file(work: Path, slide: str, seed: int, fg: float) -> Path:
    """The state dict for ``seed`` under ``work`` (built and saved once)."""
    import torch

    path = _weights_path(work, seed, fg)
    if not path.exists():
        sd = make_state_dict(seed, _calibration_patches(slide), fg)
        tmp = path.with_suffix(".tmp")
        torch.save(sd, tmp)
        tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------
# raw-map agreement (both networks in one process)
# --------------------------------------------------------------------------------------


def hovernet_model(weights: Any) -> Any:
    """wsi-nuclei's HoVer-Net fast PanNuke model (``MapModel``) with ``weights`` (a checkpoint path
    or a state dict in the official layout; no sha256 check: the weights are the benchmark's own)."""
    from wsi_nuclei.models import get_spec
    from wsi_nuclei.models.hovernet.checkpoint import load_hovernet_fast
    from wsi_nuclei.models.maps import MapModel

    net = load_hovernet_fast(weights, expected_sha256=None)
    return MapModel(get_spec("hovernet-pannuke"), net, "cpu")


def raw_agreement(weights: Path, patch) -> dict[str, Any]:
    """Max abs differences of both networks' outputs on one (256, 256, 3) uint8 patch."""
    import numpy as np
    import torch
    from tiatoolbox.models.architecture import get_pretrained_model

    from wsi_nuclei.models.hovernet.checkpoint import official_state_dict_layout

    tia_net, ioconfig = get_pretrained_model(TIA_MODEL, str(weights))
    tia_layout = {
        k: tuple(v.shape)
        for k, v in tia_net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    official = official_state_dict_layout()
    ours = hovernet_model(str(weights))
    tia_net.eval()
    batch = np.ascontiguousarray(patch[None])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        ref = tia_net(x.contiguous())
        got = ours.net(x.contiguous())
    res: dict[str, Any] = {
        "same_layout": tia_layout == official and list(tia_layout) == list(official),
        "keys": len(official),
        "tiatoolbox_io": {
            "patch_input_shape": list(ioconfig.patch_input_shape),
            "patch_output_shape": list(ioconfig.patch_output_shape),
            "stride_shape": list(ioconfig.stride_shape),
            "input_resolutions": ioconfig.input_resolutions,
        },
    }
    for head in ("np", "hv", "tp"):
        res[f"logits_{head}_max_abs_diff"] = float((ref[head] - got[head]).abs().max())
        res[f"logits_{head}_max_abs"] = float(ref[head].abs().max())
    # what each tool's own batch call returns: NP probability, HV maps, type (TIAToolbox: argmax)
    t_np, t_hv, t_tp = tia_net.infer_batch(tia_net, torch.from_numpy(batch), device="cpu")
    o = ours.infer(batch)[0]
    res["infer_np_max_abs_diff"] = float(np.abs(t_np[0, ..., 0] - o["np"]).max())
    res["infer_hv_max_abs_diff"] = float(np.abs(np.moveaxis(t_hv[0], -1, 0) - o["hv"]).max())
    res["infer_tp_argmax_agreement"] = float((t_tp[0, ..., 0] == o["tp"].argmax(0)).mean())
    res["np_foreground_fraction"] = float((o["np"] > 0.5).mean())
    return res


# --------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------
def _prepare_child(a: argparse.Namespace) -> int:
    """Child process: build the weights once and compare both tools' raw maps; JSON to --result."""
    work = Path(a.work)
    weights = weights_file(work, a.slide, a.seed, a.fg)
    out: dict[str, Any] = {"weights": str(weights)}
    if not a.skip_check:
        install_torchvision_shim(a.torchvision_shim)
        out["raw_agreement"] = raw_agreement(weights, _calibration_patches(a.slide, n=1)[0])
    Path(a.result).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _tia_child(a: argparse.Namespace) -> int:
    shim = install_torchvision_shim(a.torchvision_shim)
    import torch
    from tiatoolbox.models import NucleusInstanceSegmentor
    from tiatoolbox.wsicore.wsireader import WSIReader

    torch.set_num_threads(a.threads)
    seg = NucleusInstanceSegmentor(
        model=TIA_MODEL,
        weights=a.weights,
        batch_size=a.batch_size,
        num_workers=0,
        device="cpu",
        verbose=False,
    )
    counter = {"calls": 0, "patches": 0}

    def _count(module, inputs, output) -> None:
        counter["calls"] += 1
        counter["patches"] += int(inputs[0].shape[0])

    seg.model.register_forward_hook(_count)
    image = WSIReader.open(a.slide, mpp=(a.mpp, a.mpp)) if a.mpp else a.slide
    out_dir = Path(a.out)
    t0 = time.perf_counter()
    # QuPath JSON: the counterpart of wsi-nuclei's qupath.geojson.gz; TIAToolbox's default
    # "annotationstore" needs sqlite3 load_extension, which this Python lacks
    out = seg.run(
        [image],
        patch_mode=False,
        save_dir=out_dir,
        overwrite=True,
        output_type="qupath",
        auto_get_mask=not a.no_mask,
        device="cpu",
        batch_size=a.batch_size,
    )
    run_s = time.perf_counter() - t0
    paths = [
        Path(str(q))
        for v in (out.values() if isinstance(out, dict) else [out])
        for q in (v if isinstance(v, list) else [v])
    ]
    nuclei = 0
    for path in paths:
        if path.suffix == ".json" and path.is_file():
            doc = json.loads(path.read_text())
            nuclei += len(doc.get("features", []) if isinstance(doc, dict) else doc)
    Path(a.result).write_text(
        json.dumps(
            {
                "patches": counter["patches"],
                "forward_calls": counter["calls"],
                "nuclei": nuclei,
                "run_s": round(run_s, 2),
                "outputs": [str(p) for p in paths],
                "torchvision_shim": sorted(set(SHIM_REQUESTS)) if shim else None,
            }
        )
    )
    return 0


def _wsi_cmd(
    a: argparse.Namespace, slide: str, weights: Path, out: Path, extra: list[str]
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "wsi_nuclei.cli",
        "run",
        slide,
        "--model",
        "hovernet-pannuke",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--overwrite",
        "--no-report",
        "-q",
    ]
    if a.crop:
        cmd += ["--tissue", "none", "--mpp", str(a.slide_mpp)]
    return cmd + extra


def _wsi_result(out: Path) -> dict[str, Any]:
    """Patches, nuclei and the engine's own figures from a wsi-nuclei run's run.json."""
    run = json.loads((out / "run.json").read_text())
    qc = run.get("qc", {})
    return {
        "patches": qc.get("patches_run"),
        "nuclei": run.get("n_nuclei"),
        "tiling": run.get("tiling"),
        "qc": {
            k: v
            for k, v in qc.items()
            if k.startswith(("seconds_", "patches_", "passes_", "peak_band"))
        },
    }


def measure(
    cmd: list[str], env: dict[str, str] | None = None, poll_s: float = 0.2
) -> dict[str, Any]:
    """Run ``cmd``; its wall time, getrusage of the child and the peak RSS of its process tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"tree": 0}
    done = threading.Event()

    def _poll() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak["tree"] = max(peak["tree"], total)
            done.wait(poll_s)

    poller = threading.Thread(target=_poll, daemon=True)
    poller.start()
    output = proc.stdout.read() if proc.stdout else ""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "tree_peak_rss_mb": round(peak["tree"] / 2**20, 1),
        "user_s": round(ru.ru_utime, 1),
        "sys_s": round(ru.ru_stime, 1),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
        "output_tail": output[-2000:],
    }


# --------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per tool and the ratios wsi-nuclei / TIAToolbox of wall time, CPU time, peak RSS, patches and nuclei."""
    med: dict[str, dict[str, float | None]] = {}
    for tool in TOOLS:
        mine = [r for r in runs if r["tool"] == tool and r.get("rc") == 0]
        med[tool] = {}
        for key in KEYS:
            vals = [r[key] for r in mine if r.get(key) is not None]
            med[tool][key] = statistics.median(vals) if vals else None
        med[tool]["runs"] = len(mine)
    ratios = {}
    for key in KEYS:
        a, b = med["wsi-nuclei"][key], med["tiatoolbox"][key]
        ratios[key] = round(a / b, 3) if a is not None and b else None
    return {"median": med, "ratio_wsi_over_tia": ratios}


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table of the medians and ratios."""
    med, ratios = summary["median"], summary["ratio_wsi_over_tia"]
    rows = [
        ("wall time (s)", "wall_s", "{:.1f}"),
        ("CPU time, user + system (s)", "cpu_s", "{:.1f}"),
        ("peak RSS, process (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak RSS, process tree (MB)", "tree_peak_rss_mb", "{:.0f}"),
        ("network patches", "patches", "{:.0f}"),
        ("output nuclei (random weights)", "nuclei", "{:.0f}"),
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else spec.format(value)

    lines = [
        "| figure | wsi-nuclei | TIAToolbox | ratio wsi-nuclei / TIAToolbox |",
        "|---|---|---|---|",
    ]
    for label, key, spec in rows:
        ratio = "n/a" if ratios[key] is None else f"{ratios[key]:.2f}x"
        lines.append(
            f"| {label} | {fmt(med['wsi-nuclei'][key], spec)} | {fmt(med['tiatoolbox'][key], spec)} | {ratio} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def _write_crop(slide: str, crop: tuple[int, int, int, int], mpp: float, out: Path) -> Path:
    """The level-0 rectangle ``crop`` of ``slide`` as a tiled TIFF with ``mpp`` in its resolution tags."""
    import numpy as np
    import tifffile

    from wsi_nuclei.slide import open_slide

    path = out / f"crop-{crop[0]}-{crop[1]}-{crop[2]}x{crop[3]}.tif"
    if not path.exists():
        with open_slide(slide) as s:
            rgb = np.ascontiguousarray(np.asarray(s.read_region(crop[:2], 0, crop[2:]))[..., :3])
        px_per_cm = 1e4 / mpp
        tifffile.imwrite(
            path,
            rgb,
            photometric="rgb",
            tile=(256, 256),
            compression="zlib",
            resolution=(px_per_cm, px_per_cm),
            resolutionunit="CENTIMETER",
        )
    return path


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--slide",
        default=str(DEFAULT_SLIDE),
        help="slide (default: shared/data/wsi/CMU-1-Small-Region.svs)",
    )
    p.add_argument(
        "--crop",
        help="X,Y,W,H: process only this level-0 rectangle (written once as a TIFF), without tissue detection",
    )
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=0.499,
        help="level-0 um/px of the slide, for --crop (default: %(default)s)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per tool, alternating (default: %(default)s)"
    )
    p.add_argument(
        "--work",
        default="/tmp/bench-peers",
        help="weights, crops and outputs (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)"
    )
    p.add_argument(
        "--fg",
        type=float,
        default=0.3,
        help="foreground fraction the NP bias is set to (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of the TIAToolbox child (default: %(default)s)",
    )
    p.add_argument(
        "--tia-batch-size",
        type=int,
        default=8,
        help="TIAToolbox batch size (default: its own, %(default)s)",
    )
    p.add_argument(
        "--wsi-args",
        default="",
        help="extra arguments for 'wsi-nuclei run', e.g. '--batch-size 8 --infer-chunk 4'",
    )
    p.add_argument("--only", choices=TOOLS, help="run one tool only (the other's figures are n/a)")
    p.add_argument("--skip-check", action="store_true", help="skip the raw-map agreement check")
    p.add_argument(
        "--torchvision-shim",
        choices=("auto", "on", "off"),
        default="auto",
        help="see the module docstring (default: auto)",
    )
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--child", choices=("tiatoolbox", "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--mpp", type=float, help=argparse.SUPPRESS)
    p.add_argument("--no-mask", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child == "tiatoolbox":
        return _tia_child(a)
    if a.child == "prepare":
        return _prepare_child(a)

    missing = tiatoolbox_available()
    if missing and a.only != "wsi-nuclei":
        print(f"bench_peers: {missing}", file=sys.stderr)
        return 2
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    slide = a.slide
    if a.crop:
        crop = tuple(int(v) for v in a.crop.split(","))
        if len(crop) != 4:
            p.error("--crop wants X,Y,W,H")
        slide = str(_write_crop(a.slide, crop, a.slide_mpp, work))  # type: ignore[arg-type]
    weights = _weights_path(work, a.seed, a.fg)
    res: dict[str, Any] = {
        "slide": a.slide,
        "region": slide,
        "crop": a.crop,
        "model_mpp": MODEL_MPP,
        "seed": a.seed,
        "fg": a.fg,
        "weights": str(weights),
        "repeats": a.repeats,
        "tia_batch_size": a.tia_batch_size,
        "wsi_args": a.wsi_args,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "runs": [],
    }
    from importlib.metadata import version

    res["machine"]["torch"] = version("torch")
    # the weights and the raw-map check run in a child: the measuring process never loads a
    # network, so it stays small (a child's getrusage maximum is at least the parent's own peak
    # at the time it was started: Linux carries the high-water mark across fork and exec)
    prep = work / "prepare.json"
    prep.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "prepare", "--slide", a.slide, "--work", str(work)]
    cmd += ["--seed", str(a.seed), "--fg", str(a.fg), "--result", str(prep)]
    cmd += ["--torchvision-shim", a.torchvision_shim]
    if a.skip_check or missing:
        cmd.append("--skip-check")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not prep.exists():
        print(
            f"bench_peers: preparing the weights failed: {done.stderr.strip()[-600:]}",
            file=sys.stderr,
        )
        return 1
    check = json.loads(prep.read_text()).get("raw_agreement")
    if check:
        res["raw_agreement"] = check
        print(
            f"raw maps, one 256 x 256 patch: same layout {check['same_layout']} ({check['keys']} keys); max |diff| logits "
            f"NP {check['logits_np_max_abs_diff']:.2e} HV {check['logits_hv_max_abs_diff']:.2e} TP {check['logits_tp_max_abs_diff']:.2e}; "
            f"NP prob {check['infer_np_max_abs_diff']:.2e}, HV {check['infer_hv_max_abs_diff']:.2e}, type argmax agreement "
            f"{check['infer_tp_argmax_agreement']:.4f}; foreground {check['np_foreground_fraction']:.2f}",
            flush=True,
        )
    tools = [a.only] if a.only else list(TOOLS)
    extra = a.wsi_args.split()
    for rep in range(a.repeats):
        for tool in tools if rep % 2 == 0 else tools[::-1]:
            out = work / f"out-{tool}-{rep}"
            load_before = _load()
            if tool == "wsi-nuclei":
                run = measure(_wsi_cmd(a, slide, weights, out, extra))
                if run["rc"] == 0:
                    run.update(_wsi_result(out))
            else:
                result = work / f"tia-result-{rep}.json"
                result.unlink(missing_ok=True)
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "tiatoolbox",
                    "--slide",
                    slide,
                    "--weights",
                    str(weights),
                    "--out",
                    str(out),
                    "--result",
                    str(result),
                    "--batch-size",
                    str(a.tia_batch_size),
                    "--threads",
                    str(a.threads),
                    "--torchvision-shim",
                    a.torchvision_shim,
                ]
                if a.crop:
                    cmd += ["--mpp", str(a.slide_mpp), "--no-mask"]
                run = measure(cmd)
                if run["rc"] == 0 and result.exists():
                    run.update(json.loads(result.read_text()))
            run.update(
                tool=tool,
                repeat=rep,
                load_before=load_before,
                load_after=_load(),
                # a floor under every child's peak_rss_mb (see prepare above): must stay small
                parent_peak_rss_mb=round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
            )
            if run["rc"] == 0:
                run.pop("output_tail")
            res["runs"].append(run)
            print(
                f"{tool} #{rep}: rc {run['rc']}, wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB "
                f"(tree {run['tree_peak_rss_mb']:.0f}), patches {run.get('patches')}, nuclei {run.get('nuclei')}, "
                f"load {load_before} -> {run['load_after']}",
                flush=True,
            )
            if run["rc"] != 0:
                print(run.get("output_tail", ""), file=sys.stderr)
            if a.json:  # after every run, so that an interrupted benchmark leaves what it measured
                Path(a.json).write_text(
                    json.dumps({**res, **summarise(res["runs"])}, indent=1) + "\n"
                )
    res.update(summarise(res["runs"]))
    print(format_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if all(r["rc"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
