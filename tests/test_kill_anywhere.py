"""Kill anywhere: a job killed at any file operation resumes to the same result.

kdkit promises that "a killed run resumes to the same result; nothing is ever lost or
silently wrong". This checks it the blunt way, for whole command lines: ``kdkit train``,
``distill --teacher-cache``, ``run`` training a teacher into the teacher cache and ``run``
copying it from there (both with a teacher-output cache), ``run`` with a ``via_search``
student, and ``datafree record`` + ``synthesize`` and ``dafl``:

1. The job runs once with every file primitive instrumented, which lists its *file
   events*: every ``open`` in a writing mode (``w``, ``a``, ``x``, ``+``; numpy's
   ``open_memmap`` and ``shutil.copyfile`` go through it), ``os.open`` with write flags
   (``mkstemp``), ``os.mkdir`` (``mkdtemp``, ``Path.mkdir``), ``os.replace``/``os.rename``,
   ``os.unlink``/``os.remove`` (``Path.unlink``), ``os.rmdir``, ``shutil.rmtree`` (and the
   deletions inside it) and safetensors' ``save_file`` (written by Rust, so it is wrapped
   itself), under the job's folder.
2. For each event k, the job runs in a forked child that dies with ``os._exit(137)`` right
   before event k (no cleanup handlers, no ``finally``: a real kill), then another child
   resumes it with the job's ``--resume``.
3. The folder must then equal an uninterrupted run's: every tensor of every
   ``.safetensors`` bit for bit (a state file's JSON state too), every ``.json``/``.jsonl``
   and ``table.md`` identical once timing fields are dropped, every other file byte for
   byte, and no temporary (``.*.tmp``) left behind.

The CI variant kills each job at a fixed, seeded sample of its events that always includes
the riskiest ones; ``make test-slow`` runs the exhaustive one, every event of every job.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import re
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import kdkit
import kdkit.cli_datafree  # noqa: F401 - imported before forking: children start warm
import kdkit.datafree.dafl  # noqa: F401
import kdkit.datafree.records  # noqa: F401
import kdkit.datafree.synthesis  # noqa: F401
import kdkit.pipelines.experiment  # noqa: F401
import kdkit.train.checkpoint as checkpoint_mod
from kdkit import files
from kdkit.cli import main
from kdkit.pipelines import table

KILLED = 137
CHILD_TIMEOUT_S = 300.0
SAMPLE_SEED = "kdkit-kill-anywhere-1"  # the CI sample is fixed: same kill points every run
SAMPLE_PER_JOB = 6  # kill points per job in CI, the riskiest ones included
# Fields that measure time or say where a run came from; everything else must be identical.
TIMING_KEYS = frozenset({
    "epoch_s", "wall_s", "wall_s_mean", "build_s", "synthesis_s", "transfer_s", "latency_ms",
    *table.TIMING_KEYS, "cached_from", "resumed_from", "mtime_ns",
})
_KDKIT_SRC = str(Path(kdkit.__file__).resolve().parent) + os.sep
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_-]+-\d+\.[^./]+\.tmp$")
_REAL_OPEN = builtins.open


# ------------------------------------------------------------------------------- the jobs

_TRAIN = ("--threads", "1", "train", "--model", "mlp", "--model-arg", "hidden=[16]",
          "--data", "digits", "--train-subset", "200", "--batch-size", "64", "--no-progress")
_TEACHER = (*_TRAIN, "--epochs", "2", "--out", "{W}/teacher")
_EXPERIMENT = """\
name: tiny
seeds: [1]
data: {name: digits, val_fraction: 0.2, train_subset: 100}
teacher:
  model: {name: mlp, hidden: [16]}
  train: {epochs: 2, batch_size: 64}
student: {name: mlp, hidden: [8]}
train: {epochs: 2, batch_size: 50, teacher_cache: {views: 1}}
students:
  - {label: kd, method: {name: kd}}
eval: {latency_repeats: 1, deploy: false}
"""
_RUN = ("--threads", "1", "run", "{W}/exp.yaml", "--cache-dir", "{W}/cache", "--no-progress",
        "--no-report")
_SEARCH = _EXPERIMENT.replace(
    "train: {epochs: 2, batch_size: 50, teacher_cache: {views: 1}}",
    "train: {epochs: 1, batch_size: 50}",
).replace(
    "  - {label: kd, method: {name: kd}}",
    "  - {label: ta, method: {name: kd}, via_search: [[{name: mlp, hidden: [12]}], []]}",
)


@dataclass(frozen=True)
class Job:
    """Command lines run in turn (``{W}``: the job's folder); ``--resume`` is appended to
    each to resume. ``setup`` makes the folder the job starts from (its ``drop`` paths then
    deleted); ``expect``: the least number of events of each kind the job must perform."""

    name: str
    steps: tuple[tuple[str, ...], ...]
    expect: dict[str, int]
    setup: tuple[tuple[str, ...], ...] = ()
    drop: tuple[str, ...] = ()
    texts: dict[str, str] = field(default_factory=dict)


JOBS = [
    Job("train", steps=((*_TRAIN, "--epochs", "3", "--out", "{W}/run"),),
        expect={"checkpoint": 3, "metrics append": 3, "model file": 2, "summary": 1}),
    Job("distill-teacher-cache", setup=(_TEACHER,),
        steps=(("--threads", "1", "distill", "--teacher", "{W}/teacher", "--student", "mlp",
                "--model-arg", "hidden=[8]", "--data", "digits", "--train-subset", "200",
                "--batch-size", "64", "--epochs", "2", "--teacher-cache", "--cache-dir",
                "{W}/cache", "--no-progress", "--out", "{W}/student"),),
        expect={"checkpoint": 2, "metrics append": 2, "model file": 2, "summary": 1,
                "teacher-output cache array": 1, "teacher-output cache manifest": 1,
                "teacher-output cache publish": 1}),
    Job("run-trains-teacher", texts={"exp.yaml": _EXPERIMENT},
        steps=((*_RUN, "--out", "{W}/out"),),
        expect={"checkpoint": 4, "metrics append": 4, "model file": 4, "summary": 3,
                "teacher cache publish": 1, "teacher cache file": 4,
                "teacher-output cache array": 1, "teacher-output cache publish": 1}),
    Job("run-copies-cached-teacher", texts={"exp.yaml": _EXPERIMENT},
        setup=((*_RUN, "--out", "{W}/prep"),), drop=("prep",),
        steps=((*_RUN, "--out", "{W}/out"),),
        expect={"checkpoint": 2, "metrics append": 2, "model file": 2, "summary": 3,
                "teacher copy": 3}),
    Job("run-via-search", texts={"exp.yaml": _SEARCH},
        steps=(("--threads", "1", "run", "{W}/exp.yaml", "--no-cache", "--no-progress", "--out",
                "{W}/out", "--no-report"),),
        expect={"checkpoint": 5, "summary": 6, "model file": 8}),
    Job("datafree-record-synthesize", setup=(_TEACHER,),
        steps=(("--threads", "1", "datafree", "record", "--teacher", "{W}/teacher", "--data",
                "digits", "--kind", "top_layer", "--out", "{W}/rec", "--no-progress"),
               ("--threads", "1", "datafree", "synthesize", "--teacher", "{W}/teacher",
                "--record", "{W}/rec", "--samples", "20", "--steps", "5", "--batch-size", "10",
                "--out", "{W}/set", "--no-progress")),
        expect={"record": 1, "synthesis batch": 2, "transfer set": 1}),
    Job("datafree-dafl", setup=(_TEACHER,),
        steps=(("--threads", "1", "datafree", "dafl", "--teacher", "{W}/teacher", "--samples",
                "20", "--steps", "5", "--batch-size", "8", "--latent-dim", "8", "--width", "8",
                "--lr", "0.01", "--out", "{W}/dafl", "--no-progress"),),
        expect={"checkpoint": 4, "generator": 1, "transfer set": 1}),
]


def _caller(e: dict[str, Any], fn: str) -> str | None:
    """The kdkit function that called ``fn`` in event ``e``'s stack (None if ``fn`` is not in it)."""
    names = [frame.rsplit(" ", 1)[-1] for frame in e.get("site", [])]
    return names[names.index(fn) + 1] if fn in names[:-1] else None


def _kinds(e: dict[str, Any]) -> list[str]:
    """What an event is part of (for the coverage counts); most events are none of these."""
    op, paths, site = e["op"], e["paths"], " ".join(e.get("site", []))
    name = paths[-1].rsplit("/", 1)[-1]
    out = []
    if op == "replace":
        if name.endswith(".safetensors") and " save_state" in site and ".prev." not in name:
            out.append("checkpoint")  # save_state: the new state renamed into place
        if name in ("model.safetensors", "model.json") and " save_model" in site:
            out.append("model file")
        if name == "summary.json":
            out.append("summary")
        if _caller(e, "atomic_copy") == "_copy_cached_teacher":
            out.append("teacher copy")
        if _caller(e, "atomic_copy") == "_publish_teacher":
            out.append("teacher cache file")
        if name == "manifest.json":
            out.append("teacher-output cache manifest")
        if re.fullmatch(r"b\d{5}\.json", name):
            out.append("synthesis batch")
        if name in ("transfer.json", "record.json", "generator.json"):
            out.append({"transfer.json": "transfer set", "record.json": "record",
                        "generator.json": "generator"}[name])
    if op == "open(a)" and name == "metrics.jsonl":
        out.append("metrics append")
    if op.startswith("open(w") and name.endswith(".npy"):
        out.append("teacher-output cache array")
    if op == "rename" and " publish_dir" in site:
        out.append("teacher cache publish" if " _publish_teacher" in site
                   else "teacher-output cache publish")
    return out


_ARTIFACTS = ("model", "transfer", "generator", "record", "b00000")  # stem.safetensors + .json


def _riskiest(events: list[dict[str, Any]]) -> dict[str, int]:
    """The kill points CI always tries, where a half-done step is most likely to hurt (for
    steps done more than once, the last time)."""
    out: dict[str, int] = {}
    for k, e in enumerate(events[1:], start=1):
        prev, dst = events[k - 1], e["paths"][-1]
        prev_dst = prev["paths"][-1]
        if prev["op"] == "replace" and prev_dst.endswith(".prev.safetensors"):
            out["between the two renames of a checkpoint"] = k
        if "teacher copy" in _kinds(prev) and prev_dst.endswith("model.safetensors"):
            out["between the teacher copy's files"] = k
        if e["op"] == "rename" and " publish_dir" in " ".join(e["site"]):
            out[f"right before publishing {'/'.join(dst.split('/')[:2])}"] = k
        for stem in _ARTIFACTS:
            if prev["op"] == "replace" and prev_dst.endswith(f"/{stem}.safetensors"):
                out[f"between {stem}.safetensors and {stem}.json"] = k
        if (prev["op"] == "open(w)" and prev_dst.endswith("/model.safetensors")
                and " search_paths" in " ".join(prev["site"])):
            out["between the chosen candidate's copied model files"] = k
        if e["op"] == "unlink" and "generator-partial" in dst and "unlink" not in prev["op"]:
            out["right before the partial generator state is removed"] = k
    marks = [k for k, e in enumerate(events) if e["op"] == "open(w)"
             and e["paths"][-1].endswith(".kdkit-run.TMP")]
    if marks:  # the first run folder's marker half written: --resume must still accept it
        out["the run marker written, not yet renamed"] = marks[0]
    for k, e in enumerate(events):  # each writer's last summary, written but not renamed
        if "summary" in _kinds(e):
            writer = _caller(e, "atomic_write_json") or _caller(e, "atomic_copy")
            out[f"{writer}'s summary.json written, not yet renamed"] = k
    for marker in ("summary.json", "transfer.json"):  # the job's last one
        done = [k for k, e in enumerate(events) if e["op"] == "replace"
                and e["paths"][1].rsplit("/", 1)[-1] == marker]
        if done:
            temp = re.sub(re.escape(marker) + "$", f".{marker}.TMP", events[done[-1]]["paths"][1])
            out[f"right before {marker}"] = max(
                k for k in range(done[-1]) if events[k]["op"] == "create"
                and events[k]["paths"][0] == temp)
            out[f"{marker} written, not yet renamed"] = done[-1]
    return out


# --------------------------------------------------------------------- the instrumentation


def _normalise(rel: str) -> str:
    """A path relative to the job's folder, temporaries' random parts replaced by TMP."""
    parts = []
    for part in rel.split(os.sep):
        m = _TEMP.match(part)
        parts.append(f".{m['name']}.TMP" if m else part)
    return "/".join(parts)


def _call_site(limit: int = 5) -> list[str]:
    """The innermost kdkit frames of the current stack, as ``file:line function``."""
    out, f = [], sys._getframe(2)
    while f is not None and len(out) < limit:
        name = f.f_code.co_filename
        if name.startswith(_KDKIT_SRC):
            out.append(f"{name[len(_KDKIT_SRC):]}:{f.f_lineno} {f.f_code.co_name}")
        f = f.f_back
    return out


class Tracer:
    """Counts the file events under ``root``; records them, or kills the process at one."""

    def __init__(self, root: Path, *, kill_at: int | None = None, report: Path | None = None,
                 sites: bool = False) -> None:
        self.root = str(root) + os.sep
        self.kill_at, self.report, self.sites = kill_at, report, sites
        self.events: list[dict[str, Any]] = []
        self.in_rmtree = 0  # inside an rmtree of a folder under root (dir_fd-relative calls)

    def rel(self, path: Any, dir_fd: int | None = None) -> str | None:
        if dir_fd is not None:
            return f"<in rmtree>/{os.fsdecode(path)}" if self.in_rmtree else None
        if isinstance(path, int):
            return None
        p = os.path.abspath(os.fsdecode(os.fspath(path)))
        return _normalise(p[len(self.root):]) if p.startswith(self.root) else None

    def hit(self, op: str, *paths: str) -> None:
        event: dict[str, Any] = {"op": op, "paths": list(paths)}
        if self.sites:
            event["site"] = _call_site()
        k = len(self.events)
        self.events.append(event)
        if k == self.kill_at:
            assert self.report is not None
            with _REAL_OPEN(self.report, "w") as f:
                json.dump({"k": k, **event}, f)
            os._exit(KILLED)  # a real kill: no finally blocks, no atexit, no flushing


def _install(tr: Tracer) -> None:
    """Route every file primitive kdkit uses through ``tr`` (in a child: never undone)."""

    def two(op: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
            s, d = tr.rel(src, kw.get("src_dir_fd")), tr.rel(dst, kw.get("dst_dir_fd"))
            if s is not None or d is not None:
                tr.hit(op, s or "<outside>", d or "<outside>")
            return real(src, dst, *a, **kw)
        return wrapper

    def one(op: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(path: Any, *a: Any, **kw: Any) -> Any:
            rel = tr.rel(path, kw.get("dir_fd"))
            if rel is not None:
                tr.hit(op, rel)
            return real(path, *a, **kw)
        return wrapper

    real_os_open = os.open

    def os_open(path: Any, flags: int, *a: Any, **kw: Any) -> Any:
        if flags & _WRITE_FLAGS:
            rel = tr.rel(path, kw.get("dir_fd"))
            if rel is not None:
                tr.hit("create" if flags & os.O_CREAT else "open-write", rel)
        return real_os_open(path, flags, *a, **kw)

    def py_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if any(c in mode for c in "wax+"):
            rel = tr.rel(file)
            if rel is not None:
                tr.hit(f"open({mode.replace('b', '').replace('t', '')})", rel)
        return _REAL_OPEN(file, mode, *a, **kw)

    real_rmtree = shutil.rmtree

    def rmtree(path: Any, *a: Any, **kw: Any) -> Any:
        rel = tr.rel(path)
        if rel is None:
            return real_rmtree(path, *a, **kw)
        tr.hit("rmtree", rel)
        tr.in_rmtree += 1
        try:
            return real_rmtree(path, *a, **kw)
        finally:
            tr.in_rmtree -= 1

    rmtree.avoids_symlink_attacks = real_rmtree.avoids_symlink_attacks  # type: ignore[attr-defined]
    real_save = checkpoint_mod.save_file

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> Any:
        rel = tr.rel(filename)
        if rel is not None:
            tr.hit("save_file", rel)
        return real_save(tensors, filename, metadata=metadata)

    os.replace, os.rename = two("replace", os.replace), two("rename", os.rename)
    os.unlink, os.remove = one("unlink", os.unlink), one("unlink", os.remove)
    os.rmdir, os.mkdir = one("rmdir", os.rmdir), one("mkdir", os.mkdir)
    os.open = os_open
    builtins.open = io.open = py_open
    shutil.rmtree = rmtree
    checkpoint_mod.save_file = safetensors.torch.save_file = save_file


# ------------------------------------------------------------------------ child processes


def _fork(fn: Callable[[], int], log: Path) -> int:
    """Run ``fn`` in a forked child (output to ``log``); return its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            sys.stdout = sys.stderr = io.TextIOWrapper(io.FileIO(1, "w", closefd=False),
                                                       line_buffering=True)
            code = fn()
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            try:
                sys.stdout.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"a child ran for over {CHILD_TIMEOUT_S:.0f} s; see {log}")
        time.sleep(0.002)


def _tail(log: Path, n: int = 12) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n    ".join(lines[-n:]) or "(empty log)"


@dataclass
class Prepared:
    job: Job
    base: Path
    work: Path
    template: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)

    def argv(self, resume: bool) -> list[list[str]]:
        return [[a.replace("{W}", str(self.work)) for a in step] + (["--resume"] if resume else [])
                for step in self.job.steps]

    def run(self, resume: bool = False, tracer: Tracer | None = None) -> int:
        if tracer is not None:
            _install(tracer)
        for argv in self.argv(resume):
            rc = main(argv)
            if rc != 0:
                return rc
        return 0

    def reset(self) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        shutil.copytree(self.template, self.work, symlinks=True)


def _prepare(job: Job, base: Path) -> Prepared:
    """The job's starting folder, its events and an uninterrupted run's result."""
    p = Prepared(job, base, base / "work", base / "template")
    p.work.mkdir(parents=True)
    for name, text in job.texts.items():
        (p.work / name).write_text(text)
    for step in job.setup:  # in this process: it also warms up what the children inherit
        assert main([a.replace("{W}", str(p.work)) for a in step]) == 0, step
    for name in job.drop:
        shutil.rmtree(p.work / name)
    shutil.copytree(p.work, p.template, symlinks=True)

    dump = base / "events.json"

    def traced() -> int:
        tr = Tracer(p.work, sites=True)
        rc = p.run(tracer=tr)
        with _REAL_OPEN(dump, "w") as f:
            json.dump(tr.events, f)
        return rc

    snapshots, event_lists = [], []
    for attempt in range(2):  # twice: the job itself must be deterministic
        p.reset()
        log = base / f"reference{attempt}.log"
        assert _fork(traced, log) == 0, f"{job.name}: the job failed:\n    {_tail(log)}"
        event_lists.append(json.loads(dump.read_text()))
        temps, snap = _snapshot(p.work)
        assert not temps, f"{job.name}: an uninterrupted run leaves temporaries {temps}"
        snapshots.append(snap)
    assert event_lists[0] == event_lists[1], f"{job.name}: two runs' file events differ"
    p.events = event_lists[0]
    problems = _diff(snapshots[0], snapshots[1])
    assert not problems, f"{job.name}: two uninterrupted runs differ: {problems}"
    p.reference = snapshots[0]
    kinds = Counter(kind for e in p.events for kind in _kinds(e))
    short = {k: v for k, v in job.expect.items() if kinds[k] < v}
    assert not short, (f"{job.name}: the instrumentation missed events: expected at least "
                       f"{short}, saw {dict(kinds)}")
    return p


def _trial(p: Prepared, k: int) -> str | None:
    """Kill the job at event ``k``, resume it; None if it ends as the uninterrupted run did."""
    ev = p.events[k]
    where = (f"{p.job.name}: kill at event {k}/{len(p.events)} {ev['op']} "
             f"{' -> '.join(ev['paths'])}\n    at {' <- '.join(ev['site'])}")
    p.reset()
    report = p.base / "killed.json"
    report.unlink(missing_ok=True)
    kill_log, resume_log = p.base / "kill.log", p.base / "resume.log"
    rc = _fork(lambda: p.run(tracer=Tracer(p.work, kill_at=k, report=report)), kill_log)
    if rc != KILLED:
        return f"{where}\n  the run exited {rc} before reaching it:\n    {_tail(kill_log)}"
    got = json.loads(report.read_text())
    if (got["op"], got["paths"]) != (ev["op"], ev["paths"]):
        return f"{where}\n  but the killed run's event {k} was {got['op']} {got['paths']}"
    rc = _fork(lambda: p.run(resume=True), resume_log)
    if rc != 0:
        return f"{where}\n  the resume exited {rc}:\n    {_tail(resume_log)}"
    temps, snap = _snapshot(p.work)
    problems = _diff(p.reference, snap)
    if temps:
        problems.insert(0, f"temporaries left behind: {temps}")
    if problems:
        return f"{where}\n  after the resume: " + "\n  ".join(problems)
    return None


# ------------------------------------------------------------------------- the comparison


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _table(text: str) -> list[list[str]]:
    """table.md without its timing columns (latency, wall time)."""
    rows = [line.split("|") for line in text.splitlines()]
    drop = {i for r in rows if len(r) > 1 for i, cell in enumerate(r)
            if any(word in cell for word in ("latency", "wall", "(ms)", "faster"))}
    return [[c for i, c in enumerate(r) if i not in drop] if len(r) > 1 else r for r in rows]


def _content(path: Path) -> Any:
    """What must be identical in a file, timing fields dropped."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {}
                for name in f.keys():  # noqa: SIM118 - not a dict
                    t = f.get_tensor(name)
                    tensors[name] = (str(t.dtype), list(t.shape),
                                     t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            if "state" in meta:  # a state file's JSON state; its SHA-256 covers the timings too
                meta["state"] = _strip(json.loads(meta["state"]))
                meta.pop("sha256", None)
            return ("safetensors", meta, tensors)
        if path.suffix == ".json":
            return ("json", _strip(json.loads(path.read_text())))
        if path.suffix == ".jsonl":
            return ("jsonl", [_strip(json.loads(line)) for line in path.read_text().splitlines()])
        if path.name == "table.md":
            return ("table", _table(path.read_text()))
    except Exception as e:  # a torn or corrupt file: compared by its bytes, and named
        return ("unreadable", f"{type(e).__name__}: {e}", path.read_bytes())
    return ("bytes", path.read_bytes())


def _snapshot(root: Path) -> tuple[list[str], dict[str, Any]]:
    """(temporaries, {relative path: content}) of every folder and file under ``root``."""
    temps, out = [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in [*dirnames, *filenames]:
            if _TEMP.match(name) or name.endswith(".tmp"):
                temps.append(str(rel / name))
        dirnames[:] = sorted(d for d in dirnames if not _TEMP.match(d))
        for d in dirnames:
            out[f"{rel / d}/"] = "folder"
        for name in filenames:
            if not (_TEMP.match(name) or name.endswith(".tmp")):
                out[str(rel / name)] = _content(Path(dirpath) / name)
    return sorted(temps), out


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"),
                                         f"{where}.{k}")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    short = [repr(v)[:100] for v in (a, b)]
    return f"{where or '.'}: {short[0]} (uninterrupted) != {short[1]} (resumed)"


def _diff(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(ref) | set(got)):
        if k not in got:
            out.append(f"missing {k}")
        elif k not in ref:
            out.append(f"extra {k}")
        elif ref[k] != got[k]:
            out.append(f"{k} differs at {_first_difference(ref[k], got[k])}")
    return out


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each job's starting folder and reference run, made once (lazily) per module."""
    torch.set_num_threads(1)  # before any fork: one intra-op thread in every child
    # Warm up here what a first run initialises lazily (about a second), so that no child
    # pays it again.
    warm = tmp_path_factory.mktemp("kill-warm-up")
    assert main([*_TRAIN, "--epochs", "1", "--out", str(warm / "run")]) == 0
    done: dict[str, Prepared] = {}

    def get(job: Job) -> Prepared:
        if job.name not in done:
            torch.set_num_threads(1)
            done[job.name] = _prepare(job, tmp_path_factory.mktemp(f"kill-{job.name}"))
            print(f"\nkill-anywhere: {job.name}: {len(done[job.name].events)} kill points")
        return done[job.name]

    return get


def _sample(p: Prepared) -> dict[int, str]:
    """The CI kill points: the riskiest ones, then a seeded random pick of the others."""
    chosen: dict[int, str] = {}
    for why, k in _riskiest(p.events).items():
        chosen[k] = f"{chosen[k]}; {why}" if k in chosen else why
    rest = sorted(set(range(len(p.events))) - set(chosen))
    rng = random.Random(f"{SAMPLE_SEED}/{p.job.name}")
    for k in rng.sample(rest, max(0, min(len(rest), SAMPLE_PER_JOB - len(chosen)))):
        chosen[k] = "sampled"
    return dict(sorted(chosen.items()))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_a_job_killed_at_sampled_file_events_resumes_to_the_same_result(job, prepared):
    p = prepared(job)
    points = _sample(p)
    print(f"kill-anywhere: {job.name}: CI kills at {points}")
    problems = [f"[{why}] {problem}" for k, why in points.items()
                if (problem := _trial(p, k)) is not None]
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_a_job_killed_at_every_file_event_resumes_to_the_same_result(job, prepared):
    p = prepared(job)
    t0 = time.perf_counter()
    problems = [problem for k in range(len(p.events)) if (problem := _trial(p, k)) is not None]
    print(f"kill-anywhere: {job.name}: all {len(p.events)} kill points tried in "
          f"{time.perf_counter() - t0:.1f} s, {len(problems)} failed")
    assert not problems, f"{len(problems)} of {len(p.events)} kill points failed:\n\n" + (
        "\n\n".join(problems))


def test_the_tracer_sees_the_primitives_kdkit_uses(tmp_path):
    """Each primitive, called the ways kdkit calls it, is one event (and nothing outside)."""
    root = tmp_path / "root"
    root.mkdir()

    def body() -> int:
        tr = Tracer(root, sites=False)
        _install(tr)
        files.atomic_write_bytes(root / "a.txt", b"x")  # mkstemp, open(w), open(r+), replace
        with open(root / "a.txt", "a") as f:
            f.write("y")
        (root / "d").mkdir()
        files.temp_dir(root / "t")  # mkdtemp
        checkpoint_mod.save_checkpoint(root / "m", {"w": torch.zeros(2)}, {})
        import numpy as np

        np.lib.format.open_memmap(root / "x.npy", mode="w+", shape=(2,), dtype=np.float32)
        (root / "a.txt").unlink()
        shutil.rmtree(root / "d")
        os.rename(root / "m.json", root / "n.json")
        (root / "n.json").write_text("{}")
        with open(tmp_path / "outside.txt", "w") as f:  # not under root: not an event
            f.write("z")
        ops = [e["op"] for e in tr.events]
        with _REAL_OPEN(tmp_path / "ops.json", "w") as f:
            json.dump(ops, f)
        return 0

    assert _fork(body, tmp_path / "log") == 0, _tail(tmp_path / "log")
    ops = json.loads((tmp_path / "ops.json").read_text())
    assert ops == [
        "create", "open(w)", "open(r+)", "replace",  # atomic_write_bytes
        "open(a)", "mkdir", "mkdir",
        "create", "save_file", "open(r+)", "replace",  # the .safetensors of a checkpoint
        "create", "open(w)", "open(r+)", "replace",  # its .json
        "open(w+)", "open(r+)",  # open_memmap: the header, then the memory map
        "unlink", "rmtree", "rmdir", "rename", "open(w)",
    ], ops
