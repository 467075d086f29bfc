"""Distillation: Terms, the Distiller, and the method registry."""

from kdkit.distill.distiller import Distiller
from kdkit.distill.methods import (
    METHODS,
    MethodContext,
    build_method,
    method_arguments,
    method_needs_teacher,
    method_teachers,
    register_method,
)
from kdkit.distill.term import Term

# Method families register themselves on import.
from kdkit.distill import methods_ensemble, methods_triplet  # noqa: E402,F401  isort: skip

__all__ = [
    "METHODS",
    "Distiller",
    "MethodContext",
    "Term",
    "build_method",
    "method_arguments",
    "method_needs_teacher",
    "method_teachers",
    "register_method",
]
