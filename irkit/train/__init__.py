"""Training pieces: losses, miners, samplers and DDP helpers (see each module's docstrings)."""
from irkit.train.losses import (ArcFace, ContrastiveLoss, CosFace, CurricularFace, DescriptorQueue, JointLoss,
                                MadaCos, MomentumContrastiveLoss, MomentumEncoder, TripletLoss,
                                madacos_scale_margin)
from irkit.train.miners import (ConfusionNegativeSampler, HardNegativeMiner, batch_hard_triplets,
                                semi_hard_triplets)
from irkit.train.samplers import ClassBalancedBatchSampler

__all__ = [
    "ArcFace", "ContrastiveLoss", "CosFace", "CurricularFace", "DescriptorQueue", "JointLoss", "MadaCos",
    "MomentumContrastiveLoss", "MomentumEncoder", "TripletLoss", "madacos_scale_margin",
    "ConfusionNegativeSampler", "HardNegativeMiner", "batch_hard_triplets", "semi_hard_triplets",
    "ClassBalancedBatchSampler",
]
