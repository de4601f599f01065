"""Descriptor extraction: multi-scale as each method does it, batched where shapes allow, with image
decoding overlapped with compute, resumable into a FeatureStore (bad images logged and skipped)."""
from __future__ import annotations

import logging
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from irkit.errors import ConfigError, ImageError
from irkit.export import forward_runner, runtime_of
from irkit.io.images import crop_bbx, load_image, resize_max_side, resize_scale, to_tensor
from irkit.models.base import GlobalModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to extract: a stable id, its file, and an optional crop box [x1, y1, x2, y2]."""

    id: str
    path: str
    bbx: tuple[float, float, float, float] | None = None


def check_scales(scales: Sequence[float] | None, model: GlobalModel) -> tuple[float, ...]:
    scales = tuple(float(s) for s in (scales if scales else model.default_scales))
    if not scales or any(not np.isfinite(s) or s <= 0 or s > 8 for s in scales):
        raise ConfigError(f"scales must be positive numbers up to 8, got {list(scales)}")
    return scales


def scaled_inputs(model: GlobalModel, img: np.ndarray, scales: Sequence[float]) -> list[torch.Tensor]:
    """The network inputs [3, H, W] of one uint8 RGB image at each scale, in the model's convention.

    Resizing happens on uint8 data (max side first, then each scale), as the published code does."""
    spec = model.input_spec
    if spec.max_side:
        img = resize_max_side(img, spec.max_side, spec.interp_down, spec.interp_up)
    return [to_tensor(resize_scale(img, s, spec.interp_down, spec.interp_up), spec) for s in scales]


def reduce_scales(per_scale: torch.Tensor, how: str) -> torch.Tensor:
    """Combine [S, B, D] per-scale L2-normalised descriptors into [B, D], then L2."""
    if how == "mean":
        out = per_scale.mean(0)
    elif how == "sum":
        out = per_scale.sum(0)
    elif how == "max":
        out = per_scale.max(0).values
    else:
        raise ConfigError(f"unknown scale reduction {how!r}; use mean, sum or max")
    return F.normalize(out, dim=-1)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def stores_levels(model: GlobalModel) -> bool:
    """Whether the re-rank maps extraction hands out for ``model`` are its re-ranker's prepared
    levels (packed, see :meth:`irkit.models.cvnet.CVNetReranker.pack`) rather than raw maps."""
    reranker = getattr(model, "reranker", None)
    return bool(getattr(reranker, "stores_levels", False))


def _stored_maps(model: GlobalModel, fmap: torch.Tensor, raw: bool) -> list[np.ndarray]:
    """Per-image re-rank maps as a store keeps them: the re-ranker's packed prepared levels (what
    CVNet re-ranking reads; projected once here instead of at every query), or the raw map."""
    if raw or not stores_levels(model):
        return [m.float().contiguous().cpu().numpy() for m in fmap]
    rr = model.reranker
    levels = rr.prepare(fmap.float())
    return [rr.pack([lv[j] for lv in levels]).cpu().numpy() for j in range(fmap.shape[0])]


@torch.inference_mode()
def embed_tensors(model: GlobalModel, inputs: Sequence[Sequence[torch.Tensor]],
                  with_maps: bool = False, map_scale_index: int | None = None, raw_maps: bool = False
                  ) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Descriptors of images given as per-scale input tensors ``inputs[i][s]``.

    Images whose inputs have the same shapes at every scale run as one batch. With ``with_maps``,
    the re-rank map is taken at scale index ``map_scale_index`` (the scale 1.0 input): for a CVNet
    re-ranker its packed prepared levels (unless ``raw_maps``, for stores that hold raw maps)."""
    device = next(model.parameters()).device
    runner = forward_runner(model)   # the fastest checked runtime (irkit.export); torch otherwise
    n = len(inputs)
    descs: list[torch.Tensor | None] = [None] * n
    maps: list[np.ndarray | None] = [None] * n
    groups: dict[tuple, list[int]] = {}
    for i, per_scale in enumerate(inputs):
        groups.setdefault(tuple(tuple(t.shape) for t in per_scale), []).append(i)
    for members in groups.values():
        per_scale_out = []
        for s in range(len(inputs[members[0]])):
            batch = torch.stack([inputs[i][s] for i in members]).to(device)
            with _autocast(device):
                if with_maps and s == map_scale_index:
                    desc, fmap = model.embed_and_map(batch)
                    for i, m in zip(members, _stored_maps(model, fmap, raw_maps)):
                        maps[i] = m
                else:
                    desc = runner(batch)
            per_scale_out.append(F.normalize(desc.float(), dim=-1))
        reduced = model.post_scales(reduce_scales(torch.stack(per_scale_out), model.scale_reduce)).cpu()
        for j, i in enumerate(members):
            descs[i] = reduced[j]
    out = torch.stack(descs).numpy().astype(np.float32) if n else np.zeros((0, model.dim), np.float32)
    return out, (maps if with_maps else None)  # type: ignore[return-value]


def embed_arrays(model: GlobalModel, images: Sequence[np.ndarray], scales: Sequence[float] | None = None,
                 batch_size: int = 16) -> np.ndarray:
    """Descriptors [N, D] (float32, L2-normalised) of uint8 RGB images, in input order."""
    scales = check_scales(scales, model)
    chunks = []
    for start in range(0, len(images), batch_size):
        inputs = [scaled_inputs(model, img, scales) for img in images[start:start + batch_size]]
        chunks.append(embed_tensors(model, inputs)[0])
    return np.concatenate(chunks) if chunks else np.zeros((0, model.dim), np.float32)


def embed_files(model: GlobalModel, paths: Sequence[str | Path], scales: Sequence[float] | None = None,
                batch_size: int = 16) -> np.ndarray:
    """Descriptors of image files, in input order; a bad file raises ImageError naming it."""
    return embed_arrays(model, [load_image(p) for p in paths], scales, batch_size)


def model_config(model: GlobalModel, scales: Sequence[float], with_maps: bool) -> dict[str, Any]:
    """Everything that determines a store's descriptors (its hash guards against mixing)."""
    cfg = model.describe()
    cfg.update(scales=[float(s) for s in scales], weights=getattr(model, "weights_id", "unknown"),
               rerank_maps=bool(with_maps))
    return cfg


def _load(item: Item, model: GlobalModel, scales: tuple[float, ...]):
    try:
        img = load_image(item.path)
        if item.bbx is not None:
            img = crop_bbx(img, item.bbx)
        return item, scaled_inputs(model, img, scales), None
    except ImageError as err:
        return item, None, str(err)


def _prefetch(items: Sequence[Item], model: GlobalModel, scales: tuple[float, ...],
              workers: int) -> Iterator[tuple[Item, list[torch.Tensor] | None, str | None]]:
    """Decode and resize images in threads, a bounded window ahead of the consumer, in order."""
    if workers <= 0:
        for item in items:
            yield _load(item, model, scales)
        return
    window = max(4, workers * 4)
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        it = iter(items)
        for item in it:
            pending.append(pool.submit(_load, item, model, scales))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def extract_to_store(model: GlobalModel, items: Iterable[Item], store_dir: str | Path, *,
                     scales: Sequence[float] | None = None, with_maps: bool = False,
                     batch_size: int = 8, flush_every: int = 64, dtype: str = "float16",
                     workers: int = 2, progress: bool = True, optimize: bool = True):
    """Extract every item not yet in the store at ``store_dir`` (so an interrupted run resumes).

    Descriptors are flushed to the store every ``flush_every`` images; unreadable images are
    logged in the store's failure log and skipped. ``optimize`` runs an inference-only copy of the
    model with BatchNorm folded and channels-last layout (checked to give the same outputs)."""
    from irkit.nn.fuse import optimize_for_inference
    from irkit.store import FeatureStore

    scales = check_scales(scales, model)
    if with_maps and not model.has_rerank_map:
        raise ConfigError(f"model {model.preset_name} has no re-ranking feature map; CVNet re-ranking needs "
                          "a model with a re-ranker (cvnet-r50, cvnet-r101, effnetlite2-cvnet)")
    map_index = _scale_one_index(scales) if with_maps else None
    store = FeatureStore.open_or_create(store_dir, model=model.preset_name,
                                        config=model_config(model, scales, with_maps),
                                        dim=model.dim, dtype=dtype)
    # a store begun before irkit stored prepared levels keeps raw maps (one format per store)
    raw_maps = bool(with_maps and holds_raw_maps(store, model))
    items = list(items)
    _check_unique_ids(items)
    todo = [it for it in items if it.id not in store]  # earlier failures are retried (maybe fixed since)
    if len(todo) < len(items):
        log.info("store %s already holds %d of %d images; extracting %d", store_dir,
                 len(items) - len(todo), len(items), len(todo))
    if optimize and todo and runtime_of(model) == "torch":   # onnxruntime runs its own graph rewrites
        model = optimize_for_inference(model)
    buf_items: list[Item] = []
    buf_inputs: list[list[torch.Tensor]] = []
    pending_ids: list[str] = []
    pending_paths: list[str] = []
    pending_desc: list[np.ndarray] = []
    pending_maps: list[np.ndarray] = []

    def run_batch() -> None:
        descs, maps = embed_tensors(model, buf_inputs, with_maps, map_index, raw_maps)
        pending_ids.extend(i.id for i in buf_items)
        pending_paths.extend(i.path for i in buf_items)
        pending_desc.append(descs)
        if maps is not None:
            pending_maps.extend(maps)
        buf_items.clear()
        buf_inputs.clear()

    def flush() -> None:
        if pending_ids:
            store.add(list(pending_ids), list(pending_paths), np.concatenate(pending_desc),
                      maps=list(pending_maps) if with_maps else None)
        for lst in (pending_ids, pending_paths, pending_desc, pending_maps):
            lst.clear()

    bar = tqdm(total=len(todo), desc=f"extract {model.preset_name}", unit="img", disable=not progress)
    for item, inputs, error in _prefetch(todo, model, scales, workers):
        bar.update(1)
        if error is not None:
            log.warning("skipping %s", error)
            store.log_failure(item.id, item.path, error)
            continue
        buf_items.append(item)
        buf_inputs.append(inputs)
        if len(buf_items) >= batch_size:
            run_batch()
        if len(pending_ids) >= flush_every:
            flush()
    if buf_items:
        run_batch()
    flush()
    bar.close()
    return store


def extract(images: str | Path | Sequence[str | Path], store: str | Path, model: str | GlobalModel = "effnetlite2-gem",
            weights: str | Path | None = None, scales: Sequence[float] | None = None, device: str | None = "cpu",
            with_maps: bool = False, **options):
    """Extract a folder, a .txt/.csv list or a list of image files into the store at ``store``.

    The Python face of `irkit extract`: ``irkit.extract("photos/", "store/")``. ``model`` is a preset
    name (loaded with ``weights``) or a built model; ``options`` go to :func:`extract_to_store`."""
    from irkit.data.collection import load_collection
    from irkit.models.registry import build_model

    if isinstance(images, (str, Path)):
        col = load_collection(images)
        items = [Item(i, str(p)) for i, p in zip(col.ids, col.paths)]
    else:
        items = [Item(Path(p).stem, str(p)) for p in images]
    if isinstance(model, str):
        model = build_model(model, weights=weights, device=device)
    return extract_to_store(model, items, store, scales=scales, with_maps=with_maps, **options)


def _level_channels(model: GlobalModel) -> int | None:
    return model.reranker.conv2ds[0].out_channels if stores_levels(model) else None


def holds_raw_maps(store: Any, model: GlobalModel) -> bool:
    """Whether ``store`` keeps raw re-rank maps (written before stores kept CVNet's prepared levels):
    new maps for it must then be raw too, since a store holds one format."""
    return store.meta.get("map_channels") not in (None, _level_channels(model))


def _scale_one_index(scales: Sequence[float]) -> int:
    for i, s in enumerate(scales):
        if abs(s - 1.0) < 1e-9:
            return i
    raise ConfigError(f"re-rank maps are taken at scale 1.0, which is not among the scales {list(scales)}")


def _check_unique_ids(items: Sequence[Item]) -> None:
    seen: set[str] = set()
    dups = [it.id for it in items if it.id in seen or seen.add(it.id)]  # type: ignore[func-returns-value]
    if dups:
        raise ConfigError(f"{len(dups)} duplicate image ids, e.g. {dups[:3]}")


class _CallableModule(types.ModuleType):
    """Lets ``irkit.extract(...)`` call :func:`extract` while ``python -m irkit.extract`` still runs
    this module (the torchrun entry point)."""

    def __call__(self, *args, **kwargs):
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    # `torchrun --nproc-per-node N -m irkit.extract ARGS` = `irkit extract ARGS --distributed` (see
    # irkit.shard). Only a program entry point, never run on import: the CLI above it is imported here.
    from irkit.cli import main as _cli_main

    _argv = sys.argv[1:]
    sys.exit(_cli_main(["extract", *_argv, *([] if "--distributed" in _argv else ["--distributed"])]))
