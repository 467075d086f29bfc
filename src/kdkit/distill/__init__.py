"""Distillation: Terms, the Distiller, and the method registry."""

from kdkit.distill.distiller import Distiller
from kdkit.distill.methods import (
    METHODS,
    MethodContext,
    build_method,
    method_arguments,
    method_needs_teacher,
    register_method,
)
from kdkit.distill.term import Term

__all__ = [
    "METHODS",
    "Distiller",
    "MethodContext",
    "Term",
    "build_method",
    "method_arguments",
    "method_needs_teacher",
    "register_method",
]
