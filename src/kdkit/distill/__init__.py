"""Distillation: Terms, the Distiller, and the method registry."""

from kdkit.distill.distiller import Distiller
from kdkit.distill.methods import (
    METHODS,
    MethodContext,
    Stage,
    build_method,
    build_stages,
    method_arguments,
    method_deployment,
    method_eval_view,
    method_needs_teacher,
    method_teachers,
    register_method,
)
from kdkit.distill.term import Term

# Method families register themselves on import.
from kdkit.distill import (  # noqa: E402,F401  isort: skip
    methods_dense,
    methods_ensemble,
    methods_feature,
    methods_feature2,
    methods_lm,
    methods_logit,
    methods_mlkd,
    methods_state,
    methods_triplet,
)

__all__ = [
    "METHODS",
    "Distiller",
    "MethodContext",
    "Stage",
    "Term",
    "build_method",
    "build_stages",
    "method_arguments",
    "method_deployment",
    "method_eval_view",
    "method_needs_teacher",
    "method_teachers",
    "register_method",
]
