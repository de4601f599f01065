"""Training: one Trainer (:mod:`irkit.train.trainer`) for every recipe (:mod:`irkit.train.recipes`,
:mod:`irkit.train.recipes_rerank`), with losses, miners and DDP helpers as small pieces."""
from irkit.train.losses import (ArcFace, ContrastiveLoss, CosFace, CurricularFace, DescriptorQueue, JointLoss,
                                MadaCos, MomentumContrastiveLoss, MomentumEncoder, TripletLoss,
                                local_triplet_loss, madacos_scale_margin)
from irkit.train.miners import (ConfusionNegativeSampler, HardNegativeMiner, batch_hard_triplets, contrastive_pairs,
                                hardest_negatives, semi_hard_triplets)

__all__ = [
    "ArcFace", "ContrastiveLoss", "CosFace", "CurricularFace", "DescriptorQueue", "JointLoss", "MadaCos",
    "MomentumContrastiveLoss", "MomentumEncoder", "TripletLoss", "local_triplet_loss", "madacos_scale_margin",
    "ConfusionNegativeSampler", "HardNegativeMiner", "batch_hard_triplets", "contrastive_pairs",
    "hardest_negatives", "semi_hard_triplets",
]
