"""Loss functions: tensors in, unweighted scalar out. One file per loss family."""

from kdkit.losses.ce import CrossEntropy, cross_entropy
from kdkit.losses.ensemble import (
    EnsembleKDLoss,
    MultiStreamKDLoss,
    RandomTeacherKDLoss,
    ensemble_targets,
)
from kdkit.losses.kd import KDLoss, kd_loss, soft_kl
from kdkit.losses.lm import (
    SkewKL,
    TokenJSD,
    TokenKL,
    TokenTV,
    TopKKL,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    teacher_topk,
    token_mask,
    topk_kl,
    total_variation,
)
from kdkit.losses.logit import (
    CCLoss,
    DISTLoss,
    DKDLoss,
    NKDLoss,
    Standardized,
    standardize_logits,
)
from kdkit.losses.metric import AbsoluteTeacherLoss, RelativeTeacherLoss
from kdkit.losses.relative import RelativeDissimilarityLoss
from kdkit.losses.rkd import RKDAngleLoss, RKDDistanceLoss, rkd_angle, rkd_distance
from kdkit.losses.triplet import BatchHardTripletLoss, TripletKDLoss

__all__ = [
    "CCLoss",
    "DISTLoss",
    "DKDLoss",
    "NKDLoss",
    "Standardized",
    "standardize_logits",
    "AbsoluteTeacherLoss",
    "BatchHardTripletLoss",
    "CrossEntropy",
    "EnsembleKDLoss",
    "KDLoss",
    "MultiStreamKDLoss",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "RandomTeacherKDLoss",
    "RelativeDissimilarityLoss",
    "RelativeTeacherLoss",
    "TripletKDLoss",
    "cross_entropy",
    "ensemble_targets",
    "kd_loss",
    "rkd_angle",
    "rkd_distance",
    "soft_kl",
    "SkewKL",
    "TokenJSD",
    "TokenKL",
    "TokenTV",
    "TopKKL",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "teacher_topk",
    "token_mask",
    "topk_kl",
    "total_variation",
]
