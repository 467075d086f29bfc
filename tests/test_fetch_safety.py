"""data/fetch.py writes crash-safely: temporaries of a killed fetch are cleaned, the scratch
folder lives beside the files and is removed, and files follow the umask."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kdkit.data.fetch as fetch_mod
from kdkit import files
from kdkit.data.fetch import IDX_FILES, Log, Source, SourceFailed, fetch
from kdkit.errors import DataError

FAKE = {name: f"{name} payload\n".encode() * 50 for name in IDX_FILES}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_name(name: str, pid: int) -> str:
    return f".{name}.{files._HOST}-{pid}.abc123.tmp"


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """mnist's hashes are those of FAKE and its only source copies FAKE; returns the scratch
    folders the source was handed."""
    monkeypatch.setitem(fetch_mod.EXPECTED_SHA256, "mnist",
                        {n: hashlib.sha256(d).hexdigest() for n, d in FAKE.items()})
    scratches: list[Path] = []

    def get(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
        scratches.append(tmp)
        out = {}
        for n in names:
            (tmp / n).write_bytes(FAKE[n])
            out[n] = tmp / n
        return out

    monkeypatch.setitem(fetch_mod.SOURCES, "mnist", [Source("fake", "-", get)])
    return scratches


def test_fetch_removes_temporaries_of_killed_fetches(tmp_path: Path, fake_source: list[Path]):
    target = tmp_path / "mnist"
    target.mkdir()
    dead = _dead_pid()
    stale_file = target / _temp_name(IDX_FILES[0], dead)
    stale_file.write_bytes(b"half a file")
    stale_dir = target / _temp_name("download", dead)
    stale_dir.mkdir()
    (stale_dir / "train-images-idx3-ubyte.gz").write_bytes(b"half a download")
    live = target / _temp_name("download", os.getpid())  # being written right now
    live.mkdir()
    assert fetch("mnist", tmp_path, log=lambda s: None) == target
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.is_dir()
    assert sorted(p.name for p in target.iterdir()) == sorted([*IDX_FILES, live.name])
    # already complete: stale temporaries are still cleaned
    stale_file.write_bytes(b"half a file")
    fetch("mnist", tmp_path, log=lambda s: None)
    assert not stale_file.exists()


def test_fetch_scratch_is_beside_the_files_and_removed(
    tmp_path: Path, fake_source: list[Path], monkeypatch: pytest.MonkeyPatch
):
    target = fetch("mnist", tmp_path, log=lambda s: None)
    (scratch,) = fake_source
    assert scratch.parent == target and files.is_stale_temp(scratch) is False
    assert scratch.name.startswith(".download.") and scratch.name.endswith(".tmp")
    assert not scratch.exists()
    # a failing source leaves no scratch either

    def fail(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
        (tmp / "partial.gz").write_bytes(b"x")
        raise SourceFailed("down")

    monkeypatch.setitem(fetch_mod.SOURCES, "mnist", [Source("down", "-", fail)])
    with pytest.raises(DataError, match="down"):
        fetch("mnist", tmp_path / "other", log=lambda s: None)
    assert list((tmp_path / "other" / "mnist").iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_fetched_files_follow_the_umask(
    tmp_path: Path, fake_source: list[Path], monkeypatch: pytest.MonkeyPatch, mask: int
):
    old = os.umask(mask)
    try:
        monkeypatch.setattr(files, "_umask", None)  # files reads the umask once
        target = fetch("mnist", tmp_path / "root", log=lambda s: None)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in IDX_FILES:
        assert (target / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
