"""The Distiller: student + adapters (trainable) and frozen teachers, summed Terms.

``forward(x, y)`` returns ``{"loss": weighted sum, "logits": student logits,
"<term>": unweighted detached value, ...}``. The loop only ever calls this and
``loss.backward()``; it never knows which method runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from kdkit import dist
from kdkit.dist import gather_batch
from kdkit.distill.term import StepInfo, Term
from kdkit.errors import KdkitError
from kdkit.taps import Tap, run_with_taps


@contextmanager
def _frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BN layers in train mode normalise with batch statistics but do not update them."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class Distiller(nn.Module):
    """Trainable module = ``student`` + ``adapters`` (+ ``losses``' buffers); teachers are held
    but not registered.

    Because teachers are not submodules, ``parameters()``, ``state_dict()``, optimisers,
    checkpoints and DDP see exactly what is trained. ``.to()`` still moves the teachers.

    Args:
        student: any ``nn.Module`` mapping inputs to logits.
        teachers: name -> frozen teacher (``{}`` for plain training).
        terms: the objective; term names must be unique.
        teacher_mode: ``"eval"`` (default) or ``"train"`` (BN batch statistics, as some
            official implementations do); teachers never receive gradients either way.

    Two views (MLKD): when a term's loss has ``second_view`` (a callable ``(x, StepInfo) ->
    x2``), each step the student and the teachers also run on ``x2`` (separate forwards, the
    teachers under no_grad as always) and every loss with ``views = 2`` receives each side as
    ``[first view, second view]``; the other terms and ``"logits"`` see the first view (the
    batch) only. A teacher-output cache cannot serve a view drawn per step and is refused.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Mapping[str, nn.Module] | None,
        terms: Sequence[Term],
        *,
        teacher_mode: str = "eval",
    ) -> None:
        super().__init__()
        teachers = dict(teachers or {})
        if not terms:
            raise KdkitError("a distiller needs at least one term")
        names = [t.name for t in terms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise KdkitError(f"duplicate term names {sorted(dup)}; give each term its own name")
        for t in terms:
            for name, _tap in t.teacher_reads():
                if name not in teachers:
                    raise KdkitError(
                        f"term '{t.name}' reads teacher '{name}', but the teachers given "
                        f"are {sorted(teachers) or 'none'}; pass a teacher (e.g. --teacher RUN)"
                    )
        if teacher_mode not in ("eval", "train"):
            raise KdkitError(f"teacher_mode must be 'eval' or 'train', got {teacher_mode!r}")
        self.student = student
        # what the loop validates each epoch: the student, or the deployed model's view of
        # the training modules (set_evaluated; kept out of the module tree, so nothing is
        # registered, moved or checkpointed twice)
        self.__dict__["_evaluated"] = None
        self.adapters = nn.ModuleDict(
            {t.name: t.adapter for t in terms if t.adapter is not None}
        )
        # Losses are registered too: some hold buffers (the overhaul's margins) that must
        # move with .to() and be checkpointed; a loss with parameters is trained.
        self.losses = nn.ModuleDict({t.name: t.loss for t in terms})
        self.terms = list(terms)
        self.teacher_mode = teacher_mode
        # Plain dict: not registered, so not trained, not checkpointed, not wrapped by DDP.
        self._teachers: dict[str, nn.Module] = {}
        for name, teacher in teachers.items():
            teacher.requires_grad_(False)
            teacher.train(teacher_mode == "train")
            self._teachers[name] = teacher
        self._student_taps = {str(tap): tap for t in self.terms for tap in t.student_taps()}
        # Each teacher runs once per step and is read only where some term needs it.
        self._teacher_taps: dict[str, dict[str, Tap]] = {}
        for t in self.terms:
            for name, tap in t.teacher_reads():
                self._teacher_taps.setdefault(name, {})[str(tap)] = tap
        self._viewer = _second_view_term(self.terms)
        # each term's optional hooks, looked up once (a missing attribute of an nn.Module
        # costs an exception each time): (takes two views, begin_step, reports metrics)
        self._hooks = [(getattr(t.loss, "views", 1) == 2, getattr(t.loss, "begin_step", None),
                        bool(getattr(t.loss, "metric_names", ()))) for t in self.terms]
        # whether any loss reads the step's sample indices or seed (CRD, MLKD): the loop
        # passes them only then (under DDP every tensor argument is copied to the device)
        self.uses_step_info = self._viewer is not None or any(
            begin is not None for _, begin, _ in self._hooks)

    @property
    def teachers(self) -> dict[str, nn.Module]:
        return dict(self._teachers)

    @property
    def metric_keys(self) -> list[str]:
        """The keys of :meth:`forward`'s values besides ``loss`` and ``logits``: each term's
        name, then ``<term>/<metric>`` for each extra scalar a loss reports (its
        ``metric_names``, e.g. CTKD's temperature), which the loop logs like the terms."""
        return [t.name for t in self.terms] + [
            f"{t.name}/{m}" for t in self.terms for m in getattr(t.loss, "metric_names", ())]

    def begin_fit(self, *, num_samples: int, seed: int = 0) -> None:
        """Before training on a set of ``num_samples`` samples (the loop calls it first, a
        resume included): losses with per-sample state (CRD's memory bank) size it."""
        for t in self.terms:
            hook = getattr(t.loss, "begin_fit", None)
            if hook is not None:
                hook(num_samples, seed)

    @property
    def second_view(self) -> str | None:
        """The name of the term that makes a second view of each batch (MLKD's strong view),
        or None. Such a view is drawn afresh every step, so a teacher-output cache cannot
        serve it."""
        return self._viewer.name if self._viewer is not None else None

    @property
    def teacher_taps(self) -> dict[str, list[str]]:
        """Teacher name -> keys of the taps read from it (what a teacher-output cache stores)."""
        return {name: sorted(taps) for name, taps in self._teacher_taps.items()}

    @property
    def evaluated(self) -> nn.Module:
        """The model the loop's per-epoch validation evaluates (default: the student)."""
        view = self.__dict__["_evaluated"]
        return self.student if view is None else view

    def set_evaluated(self, model: nn.Module | None) -> None:
        """Validate ``model`` (built on this distiller's own modules, e.g. SimKD's student
        + projector + teacher classifier) instead of the bare student."""
        self.__dict__["_evaluated"] = model

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        for t in self._teachers.values():
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for t in self._teachers.values():
            t.train(mode and self.teacher_mode == "train")
        return self

    def teacher_outputs(self, x: Tensor) -> dict[str, dict[str, Tensor]]:
        """Run each teacher once (no grad) and return its tapped tensors by tap key.

        In ``teacher_mode="train"`` BatchNorm uses the batch's statistics but its running
        statistics are left untouched: the teacher is never changed by distillation, so
        runs sharing it stay independent and a resumed run stays exact.
        """
        out: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name, taps in self._teacher_taps.items():
                teacher = self._teachers[name]
                with _frozen_bn_stats(teacher):
                    _, feats = run_with_taps(teacher, x, taps)
                out[name] = feats
        return out

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        progress: float = 0.0,
        teacher_outputs: Mapping[str, Mapping[str, Tensor]] | None = None,
        global_batch: tuple[int, ...] | None = None,
        index: Tensor | None = None,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """Compute the objective on a batch.

        Args:
            x: inputs (B, ...). y: labels (B,), needed by label terms.
            progress: fraction of training done, in [0, 1], for scheduled weights.
            teacher_outputs: precomputed teacher tensors (from a cache) to skip teacher
                forwards; same layout as :meth:`teacher_outputs`.
            global_batch: under DDP, every rank's shard size (rank order): the terms that
                relate samples (RKD, SP, PKT, triplets, ...) then see the global batch, all
                gathered with gradient (``global_batch_terms``); None: each rank's shard.
            index: the batch rows' sample indices (B,) in the training set, for losses with
                per-sample state (CRD's memory bank); the loop passes its loader's.
            seed: this step's seed for losses' random draws (CRD's negatives), the same on
                every rank; the loop passes one per (run seed, epoch, step).
        """
        logits, s_feats = run_with_taps(self.student, x, self._student_taps)
        t_all = teacher_outputs if teacher_outputs is not None else self.teacher_outputs(x)
        s_feats2: dict[str, Tensor] = {}
        t_all2: Mapping[str, Mapping[str, Tensor]] = {}
        if self._viewer is not None:  # a second view (MLKD): student and teachers run on it too
            if teacher_outputs is not None:
                raise KdkitError(no_cache_message(self._viewer.name))
            x2 = getattr(self._viewer.loss, "second_view")(  # noqa: B009
                x, StepInfo(progress, index, seed, self.student, self.teachers))
            if x2 is x:  # this step's second view is the batch itself (on-policy, λ < 1)
                s_feats2, t_all2 = s_feats, t_all
            else:
                _, s_feats2 = run_with_taps(self.student, x2, self._student_taps)
                t_all2 = self.teacher_outputs(x2)
        result: dict[str, Tensor] = {"logits": logits}
        total: Tensor | None = None
        for term, (two_views, begin_step, reports) in zip(self.terms, self._hooks, strict=True):
            reads = [t_all[name][str(tap)] for name, tap in term.teacher_reads()]
            t_val: Tensor | list[Tensor] | None = None
            if reads:
                t_val = reads if term.teacher_is_list else reads[0]
            s_val = [s_feats[str(tap)] for tap in term.student_taps()]
            s_in: Tensor | list[Tensor] = s_val if isinstance(term.student, tuple) else s_val[0]
            if two_views:  # [first view, second view] of each side
                key = str(term.student_taps()[0])
                s_in = [s_feats[key], s_feats2[key]]
                if reads:
                    name, t_tap = term.teacher_reads()[0]
                    t_val = [t_all[name][str(t_tap)], t_all2[name][str(t_tap)]]
            gather = None
            if global_batch is not None and term.relates_samples:
                gather = partial(gather_batch, sizes=global_batch)
            if begin_step is not None:
                if (gather is None and dist.world_size() > 1
                        and getattr(term.loss, "needs_global_batch", False)):
                    raise KdkitError(
                        f"term '{term.name}' keeps per-sample state that every process must "
                        "update with the same samples: under torchrun it needs the global "
                        "batch (train.global_batch_terms: true, or --global-batch-terms)")
                idx = index
                if idx is not None and gather is not None:
                    idx = gather(idx.to(logits.device))
                begin_step(StepInfo(progress, idx, seed))
            value = term.compute(s_in, t_val, y, gather=gather)
            w = term.weight_at(progress)
            if w != 0.0:  # (the same sum as 0 + w1*v1 + ..., without the extra operations)
                weighted = value if w == 1.0 else w * value
                total = weighted if total is None else total + weighted
            result[term.name] = value.detach()
            if reports:
                for k, v in getattr(term.loss, "metrics")().items():  # noqa: B009
                    result[f"{term.name}/{k}"] = v.detach()
        result["loss"] = total if total is not None else logits.new_zeros((), dtype=torch.float32)
        return result




def no_cache_message(term: str) -> str:
    return (f"term '{term}' runs the teachers on a second, strong view of each batch "
            "drawn afresh every step, which a teacher-output cache cannot hold: remove "
            "train.teacher_cache (--teacher-cache) from this run")


def _second_view_term(terms: Sequence[Term]) -> Term | None:
    """The term whose loss makes a second view of each batch (``loss.second_view(x, info)``,
    MLKD's strong view), checking the terms that take two views (``loss.views == 2``: each
    side is passed as ``[first view, second view]``): one student tap, at most one teacher
    read, no adapter, and exactly one maker of the view."""
    two = [t for t in terms if getattr(t.loss, "views", 1) == 2]
    makers = [t for t in terms if getattr(t.loss, "second_view", None) is not None]
    if not two and not makers:
        return None
    if len(makers) != 1:
        raise KdkitError(
            f"terms {[t.name for t in two]} take two views of each batch, so exactly one term "
            f"must make the second view; got {[t.name for t in makers] or 'none'}")
    for t in two:
        if len(t.student_taps()) != 1 or len(t.teacher_reads()) > 1 or t.adapter is not None \
                or t.teacher_view is not None:
            raise KdkitError(f"term '{t.name}' takes two views: it reads one student tap and at "
                             "most one teacher tap, without an adapter or a teacher view")
    if makers[0] not in two:
        raise KdkitError(f"term '{makers[0].name}' makes a second view but does not take it "
                         "(its loss needs views = 2)")
    return makers[0]
