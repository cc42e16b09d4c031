"""The engine's memory-bounding changes leave every value unchanged.

* a batch inferred in chunks of ``infer_chunk`` patches gives the maps of the whole-batch call,
  and no network call sees more than the chunk;
* the blender (preallocated per-patch buffer, float16 written straight from the float32 mean,
  no band-sized temporaries) emits the bytes of the plain weighted mean.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wsi_nuclei.engine import EngineContext, MapBlender, infer_patches, register_instance
from wsi_nuclei.pipeline import CPU_INFER_CHUNK, resolve_infer_chunk
from wsi_nuclei.tiling import BlockGrid, PatchGrid, blend_weights


class _PixelModel:
    """A deterministic per-patch "network": maps are functions of each patch's pixels only."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        self.calls.append(len(batch))
        x = batch.astype(np.float32) / 255.0
        return [
            {"np": x[i, ..., 0], "hv": np.stack([x[i, ..., 1], -x[i, ..., 2]])}
            for i in range(len(batch))
        ]


def _ctx(model: _PixelModel, chunk: int) -> EngineContext:
    pg = PatchGrid(512, 512, 64, 64, 48)
    bg = BlockGrid(512, 512, 128, 16)
    return EngineContext(
        None, register_instance(model), pg, bg, 1.0, 0.5, 0.5, 0.5, "fp", infer_chunk=chunk
    )


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_inference_gives_the_whole_batch_maps(chunk: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    whole_model, chunk_model = _PixelModel(), _PixelModel()
    ref, lay_ref, _, _, _ = infer_patches(_ctx(whole_model, 0), (images, 0.0))
    got, lay, _, _, splits = infer_patches(_ctx(chunk_model, chunk), (images, 0.0))
    assert whole_model.calls == [10]
    assert max(chunk_model.calls) <= chunk and sum(chunk_model.calls) == 10
    assert lay == lay_ref and splits == 0
    assert got.dtype == np.float16 and got.shape == (10, 3, 64, 64)
    assert got.tobytes() == ref.tobytes()


def test_resolve_infer_chunk() -> None:
    assert resolve_infer_chunk(None, "cpu", 16) == CPU_INFER_CHUNK
    assert resolve_infer_chunk(None, "cuda", 16) == 0  # the whole batch
    assert resolve_infer_chunk(8, "cuda", 16) == 8
    assert resolve_infer_chunk(16, "cpu", 16) == 0 and resolve_infer_chunk(32, "cpu", 16) == 0
    with pytest.raises(ValueError):
        resolve_infer_chunk(0, "cpu", 16)
    # a model's own CPU default (HoVer-Net fast: one heavy patch per call); --infer-chunk wins
    from wsi_nuclei.models import get_spec

    assert get_spec("hovernet-pannuke").cpu_infer_chunk == 1
    assert resolve_infer_chunk(None, "cpu", 16, 1) == 1
    assert resolve_infer_chunk(4, "cpu", 16, 1) == 4
    assert resolve_infer_chunk(None, "cuda", 16, 1) == 0


def _reference_blend(
    pg: PatchGrid, x0: int, x1: int, patches: dict, c: int, fill: np.ndarray
) -> np.ndarray:
    """The plain weighted mean over the canvas rows ``0 .. H`` and columns ``x0 .. x1``."""
    n = pg.output_size
    w1 = blend_weights(n, pg.stride)
    w2 = np.outer(w1, w1).astype(np.float32)
    top = int(pg.output_start(0))
    h = int(pg.output_start(pg.n_rows - 1)) + n - top
    acc = np.zeros((c + 1, h, x1 - x0), np.float32)
    for (r, col), m in sorted(patches.items()):
        py, px = int(pg.output_start(r)) - top, int(pg.output_start(col)) - x0
        a0, a1 = max(0, px), min(x1 - x0, px + n)
        if a1 <= a0:
            continue
        acc[:c, py : py + n, a0:a1] += (
            m[:, :, a0 - px : a1 - px].astype(np.float32) * w2[:, a0 - px : a1 - px]
        )
        acc[c, py : py + n, a0:a1] += w2[:, a0 - px : a1 - px]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = acc[:c] / acc[c]
    return np.where(acc[c] > 0, mean, fill[:, None, None]).astype(np.float16), top


def test_blender_emits_the_plain_weighted_mean() -> None:
    pg = PatchGrid(700, 600, 96, 96, 64)
    rng = np.random.default_rng(3)
    c, x0, x1 = 3, -16, 500
    fill = np.array([0.25, -1.0, 0.1], np.float32)
    patches = {}
    for r in range(pg.n_rows):
        for col in range(pg.n_cols):
            if rng.random() < 0.25:  # holes: the fill where no patch ran
                continue
            patches[(r, col)] = (rng.standard_normal((c, 96, 96)) * 2).astype(np.float16)
    bl = MapBlender(pg, x0, x1, c, fill)
    for p in sorted(patches):
        bl.add(p, patches[p])
    bl.finish()
    ref, top = _reference_blend(pg, x0, x1, patches, c, fill)
    for y0, ch in bl.chunks:
        assert ch.dtype == np.float16
        assert (
            ch.tobytes()
            == np.ascontiguousarray(ref[:, y0 - top : y0 - top + ch.shape[1]]).tobytes()
        ), y0


def test_context_default_is_the_whole_batch() -> None:
    assert {f.name: f.default for f in dataclasses.fields(EngineContext)}["infer_chunk"] == 0


class _ConcurrencyModel(_PixelModel):
    """Records how many calls run at once and torch's thread count inside each call."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.threads: set[int] = set()

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        import time

        import torch

        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.threads.add(torch.get_num_threads())
        time.sleep(0.05)  # long enough for the other thread's call to overlap, if allowed
        out = super().infer(batch)
        with self.lock:
            self.active -= 1
        return out


@pytest.mark.parametrize("slots", [1, 2])
def test_network_calls_at_once_and_their_torch_threads(slots: int) -> None:
    """A CPU run lets up to ``infer_slots`` single-threaded calls run at once (2 cores: CMU in
    float32 28.7-30.3 s against 31.5-32.0 s with one two-thread call at a time); afterwards
    torch's thread count is what it was."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from wsi_nuclei.engine._context import restore_torch_threads

    before = torch.get_num_threads()
    model = _ConcurrencyModel()
    ctx = dataclasses.replace(_ctx(model, 2), infer_slots=slots, torch_threads=1)
    images = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: infer_patches(ctx, (images, 0.0))[0], range(4)))
    assert model.max_active == slots
    assert model.threads == {1}
    assert all(o.tobytes() == outs[0].tobytes() for o in outs)
    restore_torch_threads()
    assert torch.get_num_threads() == before


def test_cpu_runs_share_the_cores_between_single_threaded_calls() -> None:
    from wsi_nuclei.pipeline import RunConfig
    from wsi_nuclei.pipeline.plan import _threading

    cfg = RunConfig(slide="x.svs", threads=3)
    # (torch threads per call, calls at once)
    assert _threading(cfg, "cpu") == (1, 3)
    assert _threading(cfg, "cuda") == (0, 1)  # in-process: torch's own
    assert _threading(dataclasses.replace(cfg, workers=2), "cuda") == (3, 1)
    # a remote scheduler's workers are not this machine's: leave their threads alone
    assert _threading(dataclasses.replace(cfg, scheduler="tcp://h:8786"), "cpu") == (0, 1)


def test_one_batch_runs_its_chunks_side_by_side_with_the_same_bytes() -> None:
    """A run with a single batch in flight (a small region) still uses every slot: its own
    chunks run at once, and the maps are those of the chunks one after the other."""
    images = np.random.default_rng(2).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    seq_model, par_model = _ConcurrencyModel(), _ConcurrencyModel()
    seq = dataclasses.replace(_ctx(seq_model, 2), infer_slots=1, torch_threads=1)
    par = dataclasses.replace(_ctx(par_model, 2), infer_slots=2, torch_threads=1)
    a = infer_patches(seq, (images, 0.0))
    b = infer_patches(par, (images, 0.0))
    from wsi_nuclei.engine._context import restore_torch_threads

    restore_torch_threads()
    assert seq_model.max_active == 1 and par_model.max_active == 2
    assert sorted(par_model.calls) == [2, 2, 2, 2] and par_model.threads == {1}
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
