"""Recipe ``cvnet-rerank``: a CVNet correlation-verification re-ranker trained on a frozen backbone.

METHODS §2: the backbone is frozen; the pyramid projections (``conv2ds``), the 4D encoder and the
head are trained with a 2-way cross-entropy on (query, positive) and (query, negative) pairs; hard
negatives are the most similar non-matching images by global descriptor (top-``mining.num_hard``
per query, re-mined every ``mining.remine_every`` steps from a random part of the bank);
Hide-and-Seek hides random grid cells of the feature maps; a curriculum grows the share of hard
negatives (vs random ones) and the hiding probability.

It runs on the common :class:`irkit.train.trainer.Trainer` (loop, optimiser, schedule, checkpoints,
exact resume, metrics and learning curve). What is its own: because the backbone is frozen, every
view's stride-16 map and global descriptor are computed ONCE into a :class:`MapBank` (cached on
disk, ``data.cache_dir`` or ``out_dir``) in :meth:`CVNetRerankRecipe.setup`, and its batches are
pairs of cached maps drawn from ``(seed, step)`` (:meth:`CVNetRerankRecipe.batches`), which makes
CPU training practical (no backbone pass per step).

Data: any ``data.kind``. Label-free kinds (``synthetic``, ``scenes``): each photo gives
``data.views.per_photo`` random views (homography, colour jitter, blur, occluders, a "night"
change); views of one photo are positives. Labelled kinds (``folder``, ``gldv2``, …): images of one
class are positives, ``data.views.per_image`` views each (1 = the image itself). ``data.val_classes``
classes are held out: validation pairs on them give loss, accuracy, mean P(same) and ROC AUC
(``eval.every`` steps and at the end, in ``eval.csv``).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from irkit.config import to_dict
from irkit.data.synthetic_pairs import ViewConfig, random_view
from irkit.errors import ConfigError, DatasetError
from irkit.io.images import InputSpec, load_image, resize_max_side, to_tensor
from irkit.models.base import GlobalModel
from irkit.train import distributed as D
from irkit.train.curriculum import RerankCurriculum, Schedule
from irkit.train.data_kinds import TrainData, load_source, val_class_labels
from irkit.train.hide_and_seek import hide_and_seek
from irkit.train.miners import HardNegativeMiner
from irkit.train.recipe_base import Recipe, register
from irkit.utils import atomic_path

log = logging.getLogger(__name__)

__all__ = ["CVNetRerankRecipe", "MapBank", "PairSampler", "build_bank", "curriculum", "night", "pair_logits",
           "roc_auc", "select_on_bank"]


# ------------------------------------------------------------------------------------ the map bank
@dataclass
class MapBank:
    """Cached backbone outputs: ``maps [N, C, h, w]`` (float16), ``descs [N, D]`` (L2 global
    descriptors of the same views), ``labels [N]`` (equal = same instance), ``names`` (source of
    each row) and ``val`` (bool [N], rows of held-out classes)."""

    maps: Tensor
    descs: Tensor
    labels: Tensor
    names: list[str]
    val: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"maps": self.maps.contiguous(), "descs": self.descs.contiguous(),
                       "labels": self.labels.contiguous(), "val": self.val.to(torch.uint8).contiguous()},
                      str(tmp), metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: Path) -> "MapBank":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            names = json.loads(fh.metadata()["names"])
            t = {k: fh.get_tensor(k) for k in fh.keys()}
        return cls(t["maps"], t["descs"], t["labels"], names, t["val"].bool())


def night(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crude "night" version of a view: gamma darkening, a warm or blue colour cast and sensor
    noise (synthetic views otherwise never show the illumination changes of day/night pairs)."""
    x = img.astype(np.float32) / 255.0
    x = np.power(x, rng.uniform(1.6, 3.0)) * rng.uniform(0.5, 1.0)
    cast = np.array([1.15, 1.0, 0.75]) if rng.random() < 0.5 else np.array([0.8, 0.9, 1.15])
    x = x * cast[None, None, :].astype(np.float32)
    x = x + rng.normal(0.0, rng.uniform(0.005, 0.03), size=x.shape).astype(np.float32)
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def _make_views(img: np.ndarray, n: int, cfg, rng: np.random.Generator, plain_first: bool) -> list[np.ndarray]:
    V = cfg.data.views
    h, w = (int(s) for s in V.size)
    vcfg = ViewConfig(out_size=(h, w), crop_frac=tuple(V.crop_frac), max_rotation_deg=V.max_rotation_deg,
                      max_perspective=V.max_perspective, brightness=V.brightness, contrast=V.contrast,
                      saturation=V.saturation, hue=V.hue, occlusion_prob=V.occlusion_prob)
    out = []
    for j in range(n):
        if j == 0 and plain_first:
            interp = cv2.INTER_AREA if img.shape[0] * img.shape[1] > h * w else cv2.INTER_LINEAR
            v = cv2.resize(img, (w, h), interpolation=interp)
        else:
            v = random_view(img, rng, vcfg).image
            if rng.random() < V.night_prob:
                v = night(v, rng)
        out.append(np.ascontiguousarray(v))
    return out


@torch.no_grad()
def build_bank(model: GlobalModel, cfg, data: TrainData, progress: bool = True) -> MapBank:
    """Generate the views of ``data`` and run the frozen backbone over them once (maps + global
    descriptors); ``data.val_classes`` classes (drawn from the seed) are marked held out."""
    src, labels = data.source, np.asarray(data.labels)
    classes = np.unique(labels)
    if len(classes) < 3:
        raise DatasetError(f"cvnet-rerank needs at least 3 classes/photos, found {len(classes)}")
    V = cfg.data.views
    n_views = max(2, V.per_photo) if data.label_free else max(1, V.per_image)
    val_classes = val_class_labels(cfg, src)
    maps, descs, labs, names, val = [], [], [], [], []
    pending: list[tuple[np.ndarray, int, str]] = []
    dev = next(model.parameters()).device

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([to_tensor(v, model.input_spec) for v, _, _ in pending]).to(dev)
        dsc, fmap = model.embed_and_map(x)
        maps.append(fmap.cpu().half())
        descs.append(dsc.float().cpu())
        for _, lab, name in pending:
            labs.append(lab)
            names.append(name)
            val.append(lab in val_classes)
        pending.clear()

    for path, lab in tqdm(list(zip(src.paths, labels.tolist())), desc="bank", unit="img", disable=not progress):
        img = load_image(path)
        if data.label_free:
            img = resize_max_side(img, V.source_side)
        g = np.random.default_rng([cfg.seed, int(lab), len(names) + len(pending)])
        for v in _make_views(img, n_views, cfg, g, plain_first=not data.label_free):
            pending.append((v, int(lab), Path(path).name))
            if len(pending) >= cfg.data.extract_batch:
                flush()
    flush()
    bank = MapBank(torch.cat(maps), torch.cat(descs), torch.as_tensor(labs, dtype=torch.long), names,
                   torch.as_tensor(val, dtype=torch.bool))
    log.info("map bank: %d views of %d classes (%d held out for validation), maps %s", len(bank),
             len(classes), len(val_classes), tuple(bank.maps.shape[1:]))
    return bank


# ----------------------------------------------------------------------------------- pair sampling
class PairSampler:
    """Draws (query, key, label) pairs from the training rows of a bank.

    Positives: another row of the query's class. Negatives: with probability ``hard_share`` one of
    the query's mined hard negatives (:meth:`remine`), else a uniformly drawn row of another class.
    """

    def __init__(self, bank: MapBank, rows: Tensor, num_hard: int = 10, pool_fraction: float = 0.5) -> None:
        self.bank = bank
        self.rows = rows.long()
        self.labels = bank.labels[self.rows]
        self.num_hard = int(num_hard)
        self.pool_fraction = float(pool_fraction)
        groups: dict[int, list[int]] = {}
        for r, lab in zip(self.rows.tolist(), self.labels.tolist()):
            groups.setdefault(lab, []).append(r)
        self.by_class = {k: np.asarray(v) for k, v in groups.items()}
        self.queries = np.asarray([r for r, lab in zip(self.rows.tolist(), self.labels.tolist())
                                   if len(self.by_class[lab]) >= 2])
        if len(self.queries) == 0:
            raise DatasetError("no class has two training views/images: positives are impossible")
        self.hard: dict[int, np.ndarray] = {}

    def remine(self, step: int, seed: int) -> None:
        """Top-``num_hard`` non-matching rows by global similarity for every query, from a random
        pool of ``pool_fraction`` of the training rows (the whole set if the pool is too small)."""
        rng = np.random.default_rng([seed, step, 104729])
        all_rows = self.rows.numpy()
        n_pool = max(1, int(round(self.pool_fraction * len(all_rows))))
        pool = np.sort(rng.choice(all_rows, size=n_pool, replace=False))
        q = torch.as_tensor(self.queries)
        for candidate in (pool, all_rows):
            k = min(self.num_hard, len(np.unique(self.bank.labels[candidate].numpy())) - 1)
            if k < 1:
                continue
            try:
                negs = HardNegativeMiner(num_negatives=k)(self.bank.descs, self.bank.labels, queries=q,
                                                          pool=torch.as_tensor(candidate))
            except DatasetError:
                continue
            self.hard = {int(r): n.numpy() for r, n in zip(q.tolist(), negs)}
            return
        raise DatasetError("hard-negative mining found too few non-matching classes")

    def sample(self, n: int, hard_share: float, pos_fraction: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(query rows, key rows, labels (1 same / 0 not), is_hard)`` for ``n`` pairs."""
        qs = rng.choice(self.queries, size=n, replace=len(self.queries) < n)
        n_pos = int(round(n * pos_fraction))
        keys = np.empty(n, np.int64)
        lab = np.zeros(n, np.int64)
        hard = np.zeros(n, bool)
        for i, q in enumerate(qs.tolist()):
            c = int(self.bank.labels[q])
            if i < n_pos:
                same = self.by_class[c]
                keys[i] = rng.choice(same[same != q])
                lab[i] = 1
            elif self.hard.get(q) is not None and rng.random() < hard_share:
                keys[i] = rng.choice(self.hard[q])
                hard[i] = True
            else:
                while True:
                    k = int(rng.choice(self.rows.numpy()))
                    if int(self.bank.labels[k]) != c:
                        break
                keys[i] = k
        return qs, keys, lab, hard


# ------------------------------------------------------------------------------------------ helpers
def curriculum(cfg) -> RerankCurriculum:
    """The curriculum of ``cfg`` (``end_step: -1`` means the last step)."""
    out = {}
    for name in ("hard_negative_share", "hide_prob"):
        spec = dict(cfg.curriculum.get(name, {}))
        if spec.get("end_step", -1) in (-1, None):
            spec["end_step"] = cfg.steps
        try:
            out[name] = Schedule(**spec)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"curriculum.{name}: {exc}") from exc
    unknown = set(cfg.curriculum) - set(out)
    if unknown:
        raise ConfigError(f"unknown curriculum entries {sorted(unknown)}; use hard_negative_share, hide_prob")
    return RerankCurriculum(**out)


def pair_logits(reranker: nn.Module, qmaps: Tensor, kmaps: Tensor) -> Tensor:
    """2-way logits [B, 2] of pairs of raw maps (same sizes within each side)."""
    return reranker.logits(reranker.prepare(qmaps), reranker.prepare(kmaps))


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC: probability a positive scores above a negative (ties count half)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


# ------------------------------------------------------------------------------------------- recipe
@register("cvnet-rerank", "CVNet re-ranker on a frozen backbone: pairs of cached maps, hard negatives, "
          "Hide-and-Seek, curriculum")
class CVNetRerankRecipe(Recipe):
    """Trains ``model.reranker`` only (every other parameter frozen, backbone in eval mode) with a
    2-way cross-entropy on pairs of cached maps; see the module docstring."""

    in_batch_positives = False
    select_metric = "val_auc"

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        rr = getattr(model, "reranker", None)
        if rr is None or not getattr(model, "has_rerank_map", False):
            raise ConfigError(f"preset {cfg.model.preset!r} has no CVNet re-ranker on a rerank_map; use e.g. "
                              "effnetlite2-cvnet, effnetlite0-cvnet or cvnet-r50")
        with torch.no_grad():
            c = int(model.rerank_map(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device)).shape[1])
        if c != int(rr.conv2ds[0].in_channels):
            raise ConfigError(f"{cfg.model.preset}: rerank_map has {c} channels but the re-ranker expects "
                              f"{int(rr.conv2ds[0].in_channels)}")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in rr.parameters():
            p.requires_grad_(True)
        self.reranker = rr
        self.curriculum = curriculum(cfg)
        self.bank: MapBank | None = None
        self.sampler: PairSampler | None = None
        self.val_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._data: TrainData | None = None

    # -------------------------------------------------------------------------- config, data
    @classmethod
    def check_config(cls, cfg) -> list[str]:
        errs = []
        V = cfg.data.views
        if not 0.0 <= cfg.loss.pos_fraction <= 1.0:
            errs.append(f"loss.pos_fraction must be in [0, 1] (got {cfg.loss.pos_fraction})")
        if len(V.size) != 2 or min(V.size) < 32:
            errs.append(f"data.views.size must be [h, w], each >= 32 (got {V.size})")
        if cfg.hide.side not in ("both", "key", "query"):
            errs.append(f"hide.side must be both, key or query (got {cfg.hide.side!r})")
        M = cfg.mining
        if M.num_hard < 1 or M.remine_every < 1 or not 0 < M.pool_fraction <= 1:
            errs.append("mining needs num_hard >= 1, remine_every >= 1 and 0 < pool_fraction <= 1")
        try:
            curriculum(cfg)
        except ConfigError as exc:
            errs.append(str(exc))
        return errs

    @classmethod
    def build_data(cls, cfg, spec: InputSpec) -> TrainData:
        """Only the image list: views and maps are made in :meth:`setup`, with the frozen model."""
        src, label_free, desc = load_source(cfg)
        return TrainData(None, src.labels, src.num_classes, desc, src, label_free)

    def freeze_bn(self) -> None:
        """Nothing to do: the backbone is frozen and in eval mode anyway, and the re-ranker's
        BatchNorm layers are trained from scratch."""

    def train(self, mode: bool = True) -> "CVNetRerankRecipe":
        super().train(mode)
        self.model.eval()                     # frozen backbone (and its BN statistics)
        self.reranker.train(mode)
        return self

    def bank_path(self, trainer: Any) -> Path:
        """Cache file of the bank: keyed by what its maps depend on. The validation split is not
        part of it (set on load), nor the seed when the views are the images themselves (labelled
        kinds, ``data.views.per_image`` 1), so runs with other seeds share one bank."""
        cfg = self.cfg
        data = {k: v for k, v in to_dict(cfg.data).items()
                if k not in ("val_classes", "val_class_names", "val_max_side", "batch_size", "per_class",
                             "workers", "cache_dir", "extract_batch")}
        random_views = bool(trainer.data.label_free) or int(cfg.data.views.per_image) > 1
        parts = {"preset": cfg.model.preset, "weights": getattr(self.model, "weights_id", ""),
                 "options": cfg.model.options, "data": data, "seed": cfg.seed if random_views else None}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(cfg.data.cache_dir or cfg.out_dir) / f"bank_{key}.safetensors"

    def setup(self, trainer: Any) -> None:
        """Load the cached map bank (or build and cache it), the pair sampler and validation pairs."""
        path = self.bank_path(trainer)
        if path.is_file():
            self.bank = MapBank.load(path)
            log.info("map bank reused: %s (%d views)", path, len(self.bank))
        else:
            self.bank = build_bank(self.model, self.cfg, trainer.data, progress=self.cfg.progress and trainer.is_main)
            if trainer.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.bank.save(path)
        val = val_class_labels(self.cfg, trainer.data.source)
        self.bank.val = torch.as_tensor(np.isin(self.bank.labels.numpy(), sorted(val)), dtype=torch.bool)
        train_rows = torch.nonzero(~self.bank.val).squeeze(1)
        self.sampler = PairSampler(self.bank, train_rows, self.cfg.mining.num_hard, self.cfg.mining.pool_fraction)
        self.val_pairs = self._val_pairs()

    def _val_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Fixed pairs on the held-out classes: per held-out view one positive (another view of its
        class) and one negative (its most similar view of another class, by global descriptor)."""
        b = self.bank
        rows = torch.nonzero(b.val).squeeze(1).numpy()
        if len(rows) == 0:
            return None
        rng = np.random.default_rng([self.cfg.seed, 15485863])
        labels = b.labels.numpy()
        sims = (b.descs[rows] @ b.descs.T).numpy()
        qs, ks, ls = [], [], []
        for i, q in enumerate(rows.tolist()):
            same = np.flatnonzero(labels == labels[q])
            same = same[same != q]
            if len(same):
                qs.append(q), ks.append(int(rng.choice(same))), ls.append(1)
            s = sims[i].copy()
            s[labels == labels[q]] = -np.inf
            qs.append(q), ks.append(int(np.argmax(s))), ls.append(0)
        return np.asarray(qs), np.asarray(ks), np.asarray(ls)

    def _maps(self, rows: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
        return self.bank.maps[torch.as_tensor(rows)].to(device, torch.float32)

    def batch(self, step: int) -> dict[str, Tensor]:
        """The pairs of ``step``: a pure function of (seed, step); under DDP each rank takes its
        slice of the same pairs, so k ranks train on what one process would."""
        cfg = self.cfg
        if step % cfg.mining.remine_every == 0 or not self.sampler.hard:
            # mined at the last due step, so a resumed run sees the same hard negatives
            self.sampler.remine(step - step % cfg.mining.remine_every, cfg.seed)
        cur = self.curriculum.at(step)
        rng = np.random.default_rng([cfg.seed, step])
        qs, ks, lab, hard = self.sampler.sample(cfg.data.batch_size, cur["hard_negative_share"],
                                                cfg.loss.pos_fraction, rng)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        q, k = self._maps(qs), self._maps(ks)
        H = cfg.hide
        if cur["hide_prob"] > 0 and H.side in ("both", "query"):
            q = hide_and_seek(q, cur["hide_prob"], H.grid, H.fill, generator=gen)[0]
        if cur["hide_prob"] > 0 and H.side in ("both", "key"):
            k = hide_and_seek(k, cur["hide_prob"], H.grid, H.fill, generator=gen)[0]
        part = slice(D.rank(), None, D.world_size())
        return {"qmaps": q[part], "kmaps": k[part], "labels": torch.as_tensor(lab)[part],
                "hard": torch.as_tensor(hard)[part], "hard_share": torch.tensor(cur["hard_negative_share"]),
                "hide_prob": torch.tensor(cur["hide_prob"])}

    def batches(self, trainer: Any, start: int) -> Iterator[dict[str, Tensor]]:
        for step in range(start, self.cfg.steps):
            yield self.batch(step)

    # ---------------------------------------------------------------------------------- step
    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = pair_logits(self.reranker, batch["qmaps"], batch["kmaps"])
        y = batch["labels"]
        loss = F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            prob = torch.softmax(logits.detach().float(), 1)[:, 1].cpu().numpy()
        lab, hard = y.cpu().numpy(), batch["hard"].cpu().numpy()
        return loss, {"acc": float(((prob > 0.5) == (lab == 1)).mean()), "p_pos": _mean(prob[lab == 1]),
                      "p_neg": _mean(prob[lab == 0]), "p_hard_neg": _mean(prob[hard]),
                      "hard_share": float(batch["hard_share"]), "hide_prob": float(batch["hide_prob"])}

    @torch.no_grad()
    def validate(self, trainer: Any, batch: int = 32) -> dict[str, float]:
        """Loss, accuracy, mean P(same) of positives / negatives and ROC AUC on the held-out pairs."""
        if self.val_pairs is None:
            return {}
        qs, ks, ls = self.val_pairs
        was = self.reranker.training
        self.reranker.eval()
        dev = next(self.reranker.parameters()).device
        logits = torch.cat([pair_logits(self.reranker, self._maps(qs[i:i + batch], dev),
                                        self._maps(ks[i:i + batch], dev)).float()
                            for i in range(0, len(qs), batch)])
        self.reranker.train(was)
        y = torch.as_tensor(ls, device=logits.device)
        prob = torch.softmax(logits, 1)[:, 1].cpu().numpy()
        pos, neg = prob[ls == 1], prob[ls == 0]
        return {"val_loss": float(F.cross_entropy(logits, y)), "val_acc": float(((prob > 0.5) == (ls == 1)).mean()),
                "val_p_pos": _mean(pos), "val_p_neg": _mean(neg), "val_auc": roc_auc(pos, neg)}

    def after_fit(self, trainer: Any) -> dict[str, Any]:
        """With held-out classes: choose λ and top-k for the best checkpoint (best.safetensors, else
        the last weights) on them (:func:`select_on_bank`) and write ``out_dir/rerank.json``."""
        if self.bank is None or not bool(self.bank.val.any()):
            return {}
        import copy

        from safetensors.torch import load_file

        from irkit.train.select import save_rerank_choice

        rr = copy.deepcopy(self.reranker)
        best = Path(self.cfg.out_dir) / "best.safetensors"
        ckpt = best if best.is_file() else Path(self.cfg.out_dir) / "model.safetensors"
        if best.is_file():
            state = load_file(str(best))
            rr.load_state_dict({k[len("reranker."):]: v for k, v in state.items() if k.startswith("reranker.")})
        E = self.cfg.eval
        choice = select_on_bank(rr, self.bank, E.rerank_lambdas, E.rerank_topks, E.rerank_queries, self.cfg.seed,
                                min_gain=E.rerank_min_gain)
        path = save_rerank_choice(choice, self.cfg.out_dir, checkpoint=str(ckpt))
        log.info("re-rank choice on held-out classes: lambda %.3g, top-%d (val mAP %.2f -> %.2f) -> %s",
                 choice["lambda"], choice["topk"], choice["val_map_global"], choice["val_map"], path)
        return {"rerank": {k: choice[k] for k in ("lambda", "topk", "val_map", "val_map_global")},
                "rerank_file": str(path)}

    # -------------------------------------------------------------------------------- export
    def export_config(self) -> dict[str, Any]:
        return {"backbone_weights": getattr(self.model, "weights_id", ""),
                "train_sources": sorted(set(self.bank.names)) if self.bank is not None else []}

    def summary_extras(self) -> dict[str, Any]:
        return {"bank_views": len(self.bank) if self.bank is not None else 0,
                "train_sources": sorted(set(self.bank.names)) if self.bank is not None else []}


# ------------------------------------------------------------------------ λ / top-k on validation
@torch.no_grad()
def select_on_bank(reranker: nn.Module, bank: MapBank, lambdas=None, topks=None, max_queries: int = 60,
                   seed: int = 0, batch: int = 32, min_gain: float = 0.0) -> dict[str, Any]:
    """Choose λ and top-k of a trained re-ranker on the bank's held-out classes
    (:func:`irkit.train.select.select_rerank`): each held-out view (at most ``max_queries``, drawn
    with ``seed``) queries every other view of the bank (training classes are distractors),
    positives = the views of its class; global similarity = the bank's descriptors, re-rank score =
    P(same) of the pair."""
    from irkit.train.select import DEFAULT_LAMBDAS, DEFAULT_TOPKS, label_gnd, select_rerank

    rows = torch.nonzero(bank.val).squeeze(1).numpy()
    if len(rows) == 0:
        raise ConfigError("no held-out classes in the bank: set data.val_classes or data.val_class_names")
    if len(rows) > max_queries:
        rows = np.sort(np.random.default_rng([seed, 31337]).choice(rows, max_queries, replace=False))
    labels = bank.labels.numpy()
    sim = (bank.descs[torch.as_tensor(rows)].float() @ bank.descs.float().T).numpy()
    gnd = label_gnd(labels[rows], labels, rows)
    was = reranker.training
    reranker.eval()
    dev = next(reranker.parameters()).device

    def score(j: int, cand: np.ndarray) -> np.ndarray:
        q = bank.maps[int(rows[j])][None].to(dev, torch.float32)
        out = []
        for i in range(0, len(cand), batch):
            k = bank.maps[torch.as_tensor(cand[i:i + batch])].to(dev, torch.float32)
            logits = pair_logits(reranker, q.expand(len(k), -1, -1, -1), k).float()
            out.append(torch.softmax(logits, 1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    try:
        return select_rerank(sim, gnd, score, lambdas or DEFAULT_LAMBDAS, topks or DEFAULT_TOPKS, min_gain=min_gain)
    finally:
        reranker.train(was)
