"""Contrastive representation distillation (CRD) of Tian, Krishnan & Isola, ICLR 2020,
"Contrastive Representation Distillation", arXiv:1910.10699 (official code:
github.com/HobbitLong/RepDistiller, ``crd/``).

Both penultimate embeddings go through linear heads to 128-d and are L2-normalised
(``v_s``, ``v_t``). Two memory banks hold one 128-d entry per training sample: ``M_s`` (the
student's embeddings) and ``M_t`` (the teacher's). For each batch row i (sample index
``k_i``) and N negatives ``n_i1..n_iN`` (indices of other samples), with τ = 0.07:

    P_s[i, j] = exp(M_t[j]ᵀ v_s[i] / τ) / Z_s,   j ∈ {k_i, n_i1, ..., n_iN}
    P_t[i, j] = exp(M_s[j]ᵀ v_t[i] / τ) / Z_t

and the loss is the paper's NCE (eq. 18; the official ``ContrastLoss``, also what
torchdistill's and mdistiller's CRD use), with the noise distribution uniform,
P_n = 1/n_data, and ε = 1e-7:

    NCE(P) = −mean_i [ log(P_i0 / (P_i0 + N·P_n + ε)) + Σ_j log(N·P_n / (P_ij + N·P_n + ε)) ]
    L = NCE(P_s) + NCE(P_t)

The normalisation constants Z_s, Z_t are the memory-bank estimate of the official code:
set once, at the first batch, to mean(exp(·/τ)) · n_data, then fixed (a buffer, so it is
checkpointed). After the loss, each bank entry of the batch moves by momentum m = 0.5:
``M[k] ← normalise(m·M[k] + (1 − m)·v[k])`` (no gradient).

Negatives are drawn uniformly with replacement among the *other* samples (the official
memory's own uniform sampler, without the dataset's 'exact' mode that draws them from
other classes); N is clipped to n_data − 1. The banks start uniform in ±1/√(128/3), as
the official ones.

Gradients reach the student (through ``v_s`` and its head) and the teacher's head (through
``v_t``); the teacher's features and the banks have none.

Precision: float32 (the Term casts half-precision inputs and turns autocast off).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.errors import KdkitError

NCE_EPS = 1e-7


def nce_loss(p: Tensor, n_data: int) -> Tensor:
    """The NCE loss of CRD (eq. 18) on ``p`` (B, 1 + N): column 0 the positive's
    probability under the model, the others the negatives'; noise P_n = 1/n_data."""
    n = p.shape[1] - 1
    m_pn = n / n_data
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + m_pn + NCE_EPS))
    log_d0 = torch.log(m_pn / (p[:, 1:] + m_pn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def crd_scores(v: Tensor, memory: Tensor, rows: Tensor, tau: float) -> Tensor:
    """exp(memory[rows] · v / τ): (B, 1 + N) unnormalised scores of embeddings ``v`` (B, D)
    against the bank entries ``rows`` (B, 1 + N)."""
    w = memory[rows]  # (B, 1 + N, D)
    return torch.exp(torch.einsum("bkd,bd->bk", w, v) / tau)


def momentum_update(memory: Tensor, index: Tensor, v: Tensor, momentum: float) -> None:
    """In place: ``memory[index] ← normalise(momentum·memory[index] + (1 − momentum)·v)``."""
    with torch.no_grad():
        pos = memory[index] * momentum + v.detach().to(memory.dtype) * (1.0 - momentum)
        memory.index_copy_(0, index, F.normalize(pos, dim=1, eps=0.0))


def draw_negatives(index: Tensor, n_data: int, n: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """(B, n) indices in [0, n_data), uniform with replacement, never the row's own index."""
    r = torch.randint(0, n_data - 1, (index.shape[0], n), device=index.device,
                      generator=generator)
    return r + (r >= index[:, None]).long()


class CRDLoss(nn.Module):
    """CRD with its embedding heads and memory banks:
    ``forward(student_feat, teacher_feat, *, target) -> scalar``.

    The banks are sized by :meth:`begin_fit` (the training loop calls it with the training
    set's size before anything else, resumes included); each step needs the batch's sample
    indices, given by :meth:`begin_step` (the distiller passes the loop's ``index``).

    Args:
        s_dim, t_dim: widths of the student's / teacher's penultimate features.
        feat_dim: the embedding width (128). negatives: N (16384; clipped to n_data − 1).
        tau: NCE temperature (0.07). momentum: bank momentum (0.5).
    """

    # Under DDP the distiller gathers the global batch (and its indices) for this term, so
    # every process updates its banks with the same rows: the banks stay identical.
    relates_samples = True
    needs_global_batch = True
    memory_s: Tensor  # (n_data, feat_dim) buffers, and z (2,)
    memory_t: Tensor
    z: Tensor

    def __init__(self, s_dim: int, t_dim: int, *, feat_dim: int = 128, negatives: int = 16384,
                 tau: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if negatives < 1:
            raise KdkitError(f"crd: negatives must be >= 1, got {negatives}")
        if not tau > 0:
            raise KdkitError(f"crd: tau must be > 0, got {tau}")
        if not 0.0 <= momentum < 1.0:
            raise KdkitError(f"crd: momentum must be in [0, 1), got {momentum}")
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.feat_dim, self.negatives, self.tau, self.momentum = feat_dim, negatives, tau, momentum
        # Empty until begin_fit sizes them; always in the state dict (checkpoints, resume).
        # updated on every rank from the same (gathered) batch, so identical everywhere: DDP
        # need not broadcast them each step (kdkit.train.loop._wrap)
        self.ddp_identical_buffers = ("memory_s", "memory_t", "z")
        self.register_buffer("memory_s", torch.zeros(0, feat_dim))
        self.register_buffer("memory_t", torch.zeros(0, feat_dim))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; < 0: not yet set
        self._index: Tensor | None = None
        self._seed: int | None = None

    @property
    def n_data(self) -> int:
        return int(self.memory_s.shape[0])

    def begin_fit(self, num_samples: int, seed: int = 0) -> None:
        """Size the banks to ``num_samples`` training samples (random start, drawn from
        ``seed``); a no-op when they already have that size (a resumed or staged run)."""
        if num_samples == self.n_data:
            return
        if self.n_data:
            raise KdkitError(f"crd: the memory bank holds {self.n_data} samples but this "
                             f"training set has {num_samples}; build the method again")
        if num_samples < 2:
            raise KdkitError(f"crd needs at least 2 training samples, got {num_samples}")
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        dev = self.memory_s.device
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(num_samples, self.feat_dim, generator=g) * (2 * stdv) - stdv
            setattr(self, name, bank.to(dev))
        self.z.fill_(-1.0)

    def begin_step(self, step: Any) -> None:
        self._index, self._seed = step.index, step.seed

    def forward(self, student: Tensor, teacher: Tensor, *, target: Tensor | None = None) -> Tensor:
        index, self._index = self._index, None
        if not self.n_data:
            raise KdkitError("crd: the memory bank is not sized yet: train with kdkit's fit() "
                             "(or call distiller.begin_fit(num_samples=len(train_set)) first)")
        if index is None:
            raise KdkitError("crd needs each batch's sample indices (distiller(x, y, index=...);"
                             " kdkit's training loop passes them)")
        index = index.to(self.memory_s.device).long()
        if index.shape[0] != student.shape[0]:
            raise KdkitError(f"crd: {index.shape[0]} sample indices for a batch of "
                             f"{student.shape[0]}")
        v_s = F.normalize(self.embed_s(student.flatten(1)), dim=1)
        v_t = F.normalize(self.embed_t(teacher.detach().flatten(1)), dim=1)
        n = min(self.negatives, self.n_data - 1)
        gen = None
        if self._seed is not None:
            gen = torch.Generator(device=index.device).manual_seed(self._seed)
        rows = torch.cat([index[:, None], draw_negatives(index, self.n_data, n, gen)], dim=1)
        loss, z = crd_loss(v_s, v_t, self.memory_s, self.memory_t, rows, self.z, self.tau,
                           self.n_data)
        with torch.no_grad():
            self.z.copy_(z)
        momentum_update(self.memory_s, index, v_s, self.momentum)
        momentum_update(self.memory_t, index, v_t, self.momentum)
        return loss

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, feat_dim={self.feat_dim}, negatives={self.negatives}, "
                f"tau={self.tau}, momentum={self.momentum}")


def crd_loss(v_s: Tensor, v_t: Tensor, memory_s: Tensor, memory_t: Tensor, rows: Tensor,
             z: Tensor, tau: float, n_data: int) -> tuple[Tensor, Tensor]:
    """NCE(P_s) + NCE(P_t) of the module doc, and the normalisation constants (Z_s, Z_t)
    used: those of ``z``, or where an entry is < 0 the first-batch estimate
    mean(scores)·n_data. ``rows`` (B, 1 + N): the positive's index, then the negatives'."""
    out_s = crd_scores(v_s, memory_t, rows, tau)  # the student's embedding vs teacher bank
    out_t = crd_scores(v_t, memory_s, rows, tau)
    with torch.no_grad():  # (no host read: the check stays on the device)
        first = torch.stack([out_s.mean(), out_t.mean()]).to(z.dtype) * n_data
        z = torch.where(z < 0, first, z)
    return nce_loss(out_s / z[0], n_data) + nce_loss(out_t / z[1], n_data), z
