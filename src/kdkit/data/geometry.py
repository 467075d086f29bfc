"""What each registered dataset looks like, known without loading it.

Used to check a config before anything is downloaded or trained (``kdkit validate``):
models and methods are built for ``(num_classes, (C, H, W))``. tests/test_check.py keeps
this table equal to what the loaders in :mod:`kdkit.data` really return.
"""

from __future__ import annotations

import difflib

from kdkit.errors import KdkitError

Geometry = tuple[int, tuple[int, ...]]  # (num_classes, (C, H, W)), or (vocabulary, (L,))

GEOMETRY: dict[str, Geometry] = {
    "digits": (10, (1, 8, 8)),
    "mnist": (10, (1, 28, 28)),
    "fashion_mnist": (10, (1, 28, 28)),
    "cifar10": (10, (3, 32, 32)),
    "fake_cifar10": (10, (3, 32, 32)),
    "cifar100": (100, (3, 32, 32)),
    "shakespeare": (84, (128,)),  # characters, at the default context (see dataset_geometry)
}


TEXT_CONTEXT = 128  # a text dataset's default window (the models' context)


def dataset_geometry(name: str, *, context: int | None = None, vocab: str = "char",
                     root: str | None = None) -> Geometry:
    """``(num_classes, (C, H, W))`` of registered dataset ``name``, without loading it; for
    a text dataset ``(vocabulary size, (context,))`` (a ``text:`` folder's character
    vocabulary is read from its files)."""
    from kdkit.data.text import is_text_name

    if is_text_name(name):
        window = context or TEXT_CONTEXT
        if vocab == "byte":
            return 256, (window,)
        if name == "shakespeare":
            return 84, (window,)
        from kdkit.data.text import text_vocab

        return len(text_vocab(name, root=root)), (window,)
    if name.startswith(("folder:", "csv:")):  # image files: their classes and first image
        from kdkit.data.folder import folder_geometry

        return folder_geometry(name)
    if name not in GEOMETRY:
        close = difflib.get_close_matches(str(name), GEOMETRY, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KdkitError(
            f"the geometry of dataset '{name}' is not known without loading it{hint} "
            f"(known: {', '.join(sorted(GEOMETRY))})"
        )
    return GEOMETRY[name]
