"""Training recipes: what is optimised for each method, as one ``nn.Module`` per recipe.

Why modules: a recipe owns the retrieval model plus everything that only exists for training
(classifier weights, momentum encoder, descriptor queue, proposal head, learnable loss balance).
Its ``state_dict`` is therefore the complete training state for ``--resume``, DDP wraps it as one
module, and ``export()`` returns the inference model alone (what ``irkit extract`` loads).

The image recipes consume a batch ``{"images" [B,3,S,S], "labels" [B], "boxes" [B,4] (-1 = none)}``
laid out as groups of ``per_class`` images of one label (see :mod:`irkit.data.training`); a recipe
may draw its own batches instead (``cvnet-rerank``: pairs of cached feature maps).

=================  ===========================================================================
``cvnet-global``   CurricularFace on the descriptor + label-aware momentum contrast against a
                   queue of momentum-encoder (EMA) descriptors (CVNet, METHODS §2)
``cfcd``           MadaCos (stage 1); from ``loss.stage2_step`` on, + the local triplet on
                   attention-selected mutual-NN matches of stage-4 features (CFCD, METHODS §3)
``rmac-triplet``   R-MAC (Tolias grid, or learned region proposals) + triplet loss on batch-hard
                   triplets; with proposals, + BCE/smooth-L1 proposal loss on known boxes (§4)
``gem-contrastive`` contrastive loss (cirtorch form) on all positive pairs and the hardest
                   negatives of each image in the batch
``joint``          CosFace/normalised-softmax + in-batch ranking loss, balance learned (§5)
``cvnet-rerank``   CVNet re-ranker on a frozen backbone: 2-way CE on pairs of cached maps, mined hard
                   negatives, Hide-and-Seek, curriculum (:mod:`irkit.train.recipes_rerank`)
=================  ===========================================================================

The conv map a recipe needs (local features, regions) is captured with a forward pre-hook on the
model's ``feature_module`` (``pool``: its input is the last conv map in every irkit preset), so the
model runs once per image.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from irkit.errors import ConfigError
from irkit.models.base import GlobalModel
from irkit.models.region_rmac import FeatureTap, RegionModel
from irkit.nn.region_proposals import ProposalConfig, proposal_loss
from irkit.train import distributed as D
from irkit.train.losses import (ContrastiveLoss, CurricularFace, JointLoss, MadaCos, MomentumContrastiveLoss,
                                MomentumEncoder, TripletLoss, local_triplet_loss)
from irkit.train.recipe_base import Recipe, register
from irkit.train.miners import ConfusionNegativeSampler, batch_hard_triplets, contrastive_pairs, hardest_negatives

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- cvnet-global
@register("cvnet-global", "CurricularFace + momentum contrast (CVNet-Global)")
class CVNetGlobalRecipe(Recipe):
    """CurricularFace(scale, margin) + ``contrast_weight`` x MomentumContrastiveLoss(queue_size,
    contrast_scale) with keys from an EMA copy of the model (momentum)."""

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        L = cfg.loss
        self.cls = CurricularFace(model.dim, num_classes, scale=L.scale, margin=L.margin)
        self.key_encoder = MomentumEncoder(model, momentum=L.momentum)
        self.contrast = MomentumContrastiveLoss(model.dim, queue_size=L.queue_size, scale=L.contrast_scale)

    def forward(self, batch):
        x, y = batch["images"], batch["labels"]
        q = self.model(x)
        for mk, mq in zip(self.key_encoder.encoder.modules(), self.model.modules()):
            mk.training = mq.training          # same train/eval (e.g. frozen-BN) modes as the online model
        k = self.key_encoder(x)
        l_cls = self.cls(q, y)
        l_con = self.contrast(q, k.float(), y)
        loss = l_cls + self.cfg.loss.contrast_weight * l_con
        return loss, {"cls": float(l_cls.detach()), "contrast": float(l_con.detach())}

    @torch.no_grad()
    def after_step(self) -> None:
        self.key_encoder.update(self.model)


# ------------------------------------------------------------------------------------------ cfcd
@register("cfcd", "MadaCos, then + local triplet on confusion negatives (CFCD)")
class CFCDRecipe(Recipe):
    """MadaCos(a) on the descriptor; from step ``loss.stage2_step`` (>= 0) on, + ``local_weight`` x
    the local triplet of :func:`local_triplet_loss` over tuples (anchor, positive, ``local_negatives``
    negatives).

    Negatives (``loss.cfcd_negatives``): ``confusion`` (CFCD, the default) — when stage 2 starts,
    the stage-1 classifier predicts the class of every training image (argmax cosine to the
    MadaCos weights; kept in the ``stage1_pred`` buffer so a resumed run uses the same ones), and
    an anchor of class c gets images of other classes predicted as c
    (:class:`irkit.train.miners.ConfusionNegativeSampler`, random other-class images when too few),
    loaded from the training set and run through the model with the batch; ``in-batch`` — the
    hardest other-class images of the batch by global similarity (no extra images, cheaper)."""

    NEGATIVE_MODES = ("confusion", "in-batch")

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        if cfg.loss.cfcd_negatives not in self.NEGATIVE_MODES:
            raise ConfigError(f"loss.cfcd_negatives={cfg.loss.cfcd_negatives!r}: use one of {self.NEGATIVE_MODES}")
        self.cls = MadaCos(model.dim, num_classes, a=cfg.loss.madacos_a)
        self.tap = FeatureTap(model, cfg.model.feature_module)
        self.register_buffer("stage1_pred", torch.empty(0, dtype=torch.long))
        self._negatives: Any = None      # ConfusionNegativeSampler, built in stage 2
        self._dataset: Any = None
        self._class_rep: dict[int, int] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "stage1_pred"
        if key in state_dict:  # its length is the training set's, known only once predicted
            self.stage1_pred = torch.empty_like(state_dict[key], device=self.stage1_pred.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def before_step(self, trainer: Any) -> None:
        if self.stage() != 2 or self.cfg.loss.cfcd_negatives != "confusion" or self._negatives is not None:
            return
        labels = torch.as_tensor(trainer.labels, dtype=torch.long)
        if self.stage1_pred.numel() == 0:
            self.stage1_pred = self.predict_classes(trainer.dataset, len(labels), trainer.cfg.data.batch_size)
            trainer._train_mode()
            log.info("cfcd stage 2: stage-1 classifier accuracy on the training set %.3f",
                     float((self.stage1_pred.cpu() == labels).float().mean()))
        k = min(self.cfg.loss.local_negatives, len(labels) - int(labels.bincount().max()))
        if k < 1:
            raise ConfigError("cfcd confusion negatives need at least two classes in the training set")
        if k < self.cfg.loss.local_negatives:
            log.warning("cfcd: only %d images outside the largest class; %d negatives per tuple instead of %d",
                        k, k, self.cfg.loss.local_negatives)
        self._negatives = ConfusionNegativeSampler(labels, predictions=self.stage1_pred.cpu(), num_negatives=k,
                                                   seed=self.cfg.seed)
        self._dataset = trainer.dataset
        self._class_rep = {}
        for i, c in enumerate(labels.tolist()):
            self._class_rep.setdefault(c, i)

    @torch.no_grad()
    def predict_classes(self, dataset: Any, n: int, batch_size: int) -> Tensor:
        """[n] stage-1 predicted class of every training image (its deterministic slot-0 view):
        argmax of cos(descriptor, MadaCos weight). Ranks split the images and gather."""
        was_training = self.training
        self.eval()
        r, w = D.rank(), D.world_size()
        lo, hi = r * n // w, (r + 1) * n // w
        weight = F.normalize(self.cls.weight, dim=1)
        preds = [torch.empty(0, dtype=torch.long, device=weight.device)]
        for s in range(lo, hi, batch_size):
            x = torch.stack([dataset[(i, self.cfg.seed, 0)][0] for i in range(s, min(s + batch_size, hi))])
            preds.append((F.normalize(self.model(x.to(weight.device)), dim=1) @ weight.T).argmax(1))
        self.train(was_training)
        return D.all_gather_nograd(torch.cat(preds))  # contiguous shards in rank order = image order

    def _confusion_negative_maps(self, classes: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """Sampled negative image rows [A, K] for anchors of ``classes`` and their conv maps [A, K, C, h, w]."""
        self._negatives.set_epoch(self.step * D.world_size() + D.rank())  # reproducible, resumable
        rows = self._negatives.sample(torch.tensor([self._class_rep[c] for c in classes]))

        def view_seed(a: int, k: int) -> int:
            return int(np.random.SeedSequence([self.cfg.seed, self.step, a, k]).generate_state(1)[0])

        images = [self._dataset[(j, view_seed(a, k), 1)][0]
                  for a, row in enumerate(rows.tolist()) for k, j in enumerate(row)]
        self.model(torch.stack(images).to(device))
        maps = self.tap.take()
        return rows, maps.reshape(rows.shape[0], rows.shape[1], *maps.shape[1:])

    def stage(self) -> int:
        s2 = self.cfg.loss.stage2_step
        return 2 if (s2 >= 0 and self.step >= s2) else 1

    def forward(self, batch):
        x, y = batch["images"], batch["labels"]
        desc = self.model(x)
        fmap = self.tap.take()
        l_cls = self.cls(desc, y)
        logs = {"cls": float(l_cls.detach()), "madacos_s": self.cls.last_s, "madacos_m": self.cls.last_m,
                "local": 0.0, "matches": 0.0}
        loss = l_cls
        if self.stage() == 2:
            l_loc, n_match = self._local(desc.detach(), fmap, y)
            loss = loss + self.cfg.loss.local_weight * l_loc
            logs.update(local=float(l_loc.detach()), matches=float(n_match))
        return loss, logs

    def _local(self, desc: Tensor, fmap: Tensor, y: Tensor) -> tuple[Tensor, int]:
        L = self.cfg.loss
        pairs = []
        for i in range(len(y)):
            pos = torch.nonzero((y == y[i]) & (torch.arange(len(y), device=y.device) > i)).squeeze(1)
            if pos.numel() and (self._negatives is not None or bool((y != y[i]).any())):
                pairs.append((i, int(pos[0])))
        if not pairs:
            return fmap.sum() * 0.0, 0
        if self._negatives is not None:
            negatives = list(self._confusion_negative_maps([int(y[i]) for i, _ in pairs], fmap.device)[1])
        else:
            hardest = hardest_negatives(desc, y, L.local_negatives)       # [B, k], by global similarity
            negatives = [fmap[hardest[i]] for i, _ in pairs]
        terms, total = [], 0
        for (i, p), negs in zip(pairs, negatives):
            loss, n = local_triplet_loss(fmap[i], fmap[p], negs, L.ratio, L.top_frac, L.local_margin)
            terms.append(loss)
            total += n
        return torch.stack(terms).mean(), total


# ------------------------------------------------------------------------------------ rmac-triplet
@register("rmac-triplet", "R-MAC on a grid or learned proposals + batch-hard triplet (DIR)")
class RMACTripletRecipe(Recipe):
    """Triplet loss (margin ``triplet_margin``, ½·max(0, m + |q−p|² − |q−n|²)) on batch-hard
    triplets of R-MAC descriptors; with ``model.regions=proposals`` the proposal head is trained by
    :func:`irkit.nn.region_proposals.proposal_loss` (weight ``rpn_weight``) on the batch's boxes."""

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        M = cfg.model
        if not isinstance(model, RegionModel):
            pcfg = ProposalConfig(top_n=M.proposals_top_n, sizes=tuple(M.anchor_sizes), ratios=tuple(M.anchor_ratios))
            model = RegionModel(model, M.regions, M.rmac_levels, proposal_cfg=pcfg, feature_module=M.feature_module)
            model.options["base_options"] = dict(M.options)
        super().__init__(model, cfg, num_classes)
        self.triplet = TripletLoss(margin=cfg.loss.triplet_margin)

    def forward(self, batch):
        x, y = batch["images"], batch["labels"]
        fmap = self.model.feature_map(x)
        desc = self.model.rpool(fmap)
        a, p, n = batch_hard_triplets(desc, y)
        loss = self.triplet(desc[a], desc[p], desc[n]) if a.numel() else desc.sum() * 0.0
        logs = {"triplet": float(loss.detach()), "triplets": float(a.numel())}
        if self.model.regions_kind == "proposals":
            logs.update(rpn_cls=0.0, rpn_reg=0.0)
            boxes = batch["boxes"]
            has = boxes[:, 0] >= 0
            if has.any():
                stride = x.shape[-1] / fmap.shape[-1]
                logits, deltas, anchors = self.model.rpool.head(fmap[has].detach()
                                                               if self.cfg.loss.rpn_detach else fmap[has])
                gt = [b.unsqueeze(0) / stride for b in boxes[has]]
                l_rpn, parts = proposal_loss(logits, deltas, anchors, gt)
                loss = loss + self.cfg.loss.rpn_weight * l_rpn
                logs.update(parts)
        return loss, logs

    def export_config(self) -> dict[str, Any]:
        """The exported model is the ``rmac-regions`` preset with these options."""
        return {"preset": "rmac-regions", "options": dict(self.model.options)}


# --------------------------------------------------------------------------------- gem-contrastive
@register("gem-contrastive", "GeM + contrastive loss with in-batch hard negatives (cirtorch)")
class GeMContrastiveRecipe(Recipe):
    """Contrastive loss (margin ``contrastive_margin``) on every positive pair of the batch and, per
    image, its ``hard_negatives`` most similar images of other labels (cirtorch-style tuples)."""

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.loss_fn = ContrastiveLoss(margin=cfg.loss.contrastive_margin)

    def forward(self, batch):
        x, y = batch["images"], batch["labels"]
        d = self.model(x)
        a, b, target = contrastive_pairs(d, y, self.cfg.loss.hard_negatives)
        n_pos = int(target.sum())
        loss = self.loss_fn(d[a], d[b], target)
        return loss, {"contrastive": float(loss.detach()), "pairs": float(n_pos), "negatives": float(len(target) - n_pos)}


# ------------------------------------------------------------------------------------------ joint
@register("joint", "CosFace + in-batch ranking loss with a learned balance")
class JointRecipe(Recipe):
    """:class:`irkit.train.losses.JointLoss`: CosFace(scale, margin) + in-batch ranking
    (``joint_rank``: triplet | contrastive) with learned weights."""

    def __init__(self, model: GlobalModel, cfg, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        L = cfg.loss
        margin = L.triplet_margin if L.joint_rank == "triplet" else L.contrastive_margin
        self.joint = JointLoss(model.dim, num_classes, rank=L.joint_rank, cls_scale=L.scale,
                               cls_margin=L.margin, rank_margin=margin)

    def forward(self, batch):
        loss = self.joint(self.model(batch["images"]), batch["labels"])
        return loss, dict(self.joint.last)
