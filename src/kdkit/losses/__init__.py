"""Loss functions: tensors in, unweighted scalar out. One file per loss family."""

from kdkit.losses.ce import CrossEntropy, cross_entropy
from kdkit.losses.kd import KDLoss, kd_loss, soft_kl

__all__ = ["CrossEntropy", "KDLoss", "cross_entropy", "kd_loss", "soft_kl"]
