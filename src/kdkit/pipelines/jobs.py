"""Many sub-runs at once: ``kdkit run --jobs N``.

An experiment is many independent runs (seeds x students) after their teachers. Each ready
sub-run here becomes ``kdkit run OUT/config.yaml --out OUT --only seedK/LABEL`` in a process
of its own, with a fair share of the CPU threads (N each when ``kdkit --threads N`` or
``KDKIT_THREADS`` says so) or a GPU of its own when there are several; a student starts
once every teacher of its seed is finished. A sub-run's output goes to
``OUT/logs/seedK-LABEL.log``. Because every sub-run is the run a single process would make,
the table assembled afterwards is the same whatever the number of jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kdkit.config import ExperimentConfig
from kdkit.errors import KdkitError
from kdkit.pipelines.runs import SUMMARY

Task = tuple[int, str, bool]  # (seed, label, is a teacher)


def _finished(out_dir: Path, seed: int, label: str) -> bool:
    return (out_dir / f"seed{seed}" / label / SUMMARY).exists()


def _gpus(device: str | None, cfg: ExperimentConfig) -> int:
    """How many GPUs jobs may spread over (0: none, or a device was named explicitly, on
    the command line or in the config: then every job uses that one)."""
    if device not in (None, "auto", "cuda"):
        return 0
    if device is None:
        named = {t.train.device for t in cfg.all_teachers()}
        named |= {cfg.student_train(r).device for r in cfg.students}
        if named - {"auto", "cuda"}:
            return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _visible_gpus(count: int) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or 0..count-1)."""
    mask = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return mask[:count] if len(mask) >= count else [str(i) for i in range(count)]


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_parallel(
    cfg: ExperimentConfig, cfg_path: Path, out_dir: Path, *, jobs: int,
    selected: set[tuple[int, str]] | None, cache_dir: Path | None, device: str | None,
    log: Callable[[str], None] = print, poll_s: float = 0.2, keep_going: bool = False,
) -> None:
    """Run the experiment's unfinished sub-runs (or the ``selected`` ones), ``jobs`` at a
    time; return when all are finished; raise naming the first that failed (and its log).

    A failure stops new sub-runs from starting (those running finish), unless
    ``keep_going``: then every sub-run that does not need the failed one still runs (a
    failed teacher's students are skipped), and the error names them all at the end."""
    from kdkit.pipelines.experiment import sub_runs

    todo: list[Task] = [t for t in sub_runs(cfg) if (selected is None or t[:2] in selected)
                        and not _finished(out_dir, t[0], t[1])]
    teachers = {seed: [lab for s, lab, is_t in sub_runs(cfg) if s == seed and is_t]
                for seed in cfg.seeds}
    given = os.environ.get("KDKIT_THREADS", "").strip()  # --threads N or KDKIT_THREADS
    threads = int(given) if given.isdigit() and int(given) > 0 else max(
        1, (os.cpu_count() or 1) // jobs)
    gpus = _gpus(device, cfg)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    running: dict[Task, tuple[subprocess.Popen[bytes], Path, float, int]] = {}
    failed: list[str] = []
    skipped: list[str] = []
    log(f"kdkit run --jobs {jobs}: {len(todo)} sub-run(s) to run, {threads} thread(s) each"
        + (f", over {gpus} GPU(s)" if gpus else ""))

    def ready(task: Task) -> bool:
        seed, _label, is_teacher = task
        return is_teacher or all(_finished(out_dir, seed, t) for t in teachers[seed])

    def blocked(task: Task) -> str | None:
        """A teacher this student needs that will not be made (not selected, not finished)."""
        seed, _label, is_teacher = task
        if is_teacher:
            return None
        for t in teachers[seed]:
            if not _finished(out_dir, seed, t) and (seed, t, True) not in todo and (
                    (seed, t, True) not in running):
                return f"seed{seed}/{t}"
        return None

    for task in todo:  # before anything starts: a student whose teacher will not be made
        missing = blocked(task)
        if missing is not None:
            raise KdkitError(f"sub-run seed{task[0]}/{task[1]} needs teacher {missing}, "
                             "which is neither finished nor selected; run it first")
    try:
        while todo or running:
            for task in list(running):
                proc, path, started, _slot = running[task]
                rc = proc.poll()
                if rc is None:
                    continue
                del running[task]
                name = f"seed{task[0]}/{task[1]}"
                if rc == 0:
                    log(f"[jobs] {name} finished ({time.perf_counter() - started:.1f} s)")
                else:
                    failed.append(f"{name} failed (exit {rc}; log {path}: {_last_line(path)})")
                    log(f"[jobs] {failed[-1]}")
                    if task[2] and keep_going:  # its students cannot run
                        for t in [t for t in todo if t[0] == task[0] and not t[2]]:
                            todo.remove(t)
                            skipped.append(f"seed{t[0]}/{t[1]}")
            if failed and not keep_going:
                todo.clear()
                continue
            for task in list(todo):
                if len(running) >= jobs or not ready(task):
                    continue
                todo.remove(task)
                slot = min(set(range(jobs)) - {r[3] for r in running.values()})
                running[task] = _start(task, slot, cfg_path, out_dir, logs, threads, gpus,
                                       cache_dir, device)
                log(f"[jobs] started seed{task[0]}/{task[1]} (log {running[task][1]})")
            time.sleep(poll_s)
    except BaseException:
        for proc, *_ in running.values():  # Ctrl-C reached them too; let them checkpoint
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    if failed:
        more = (f"; {len(skipped)} skipped for a failed teacher ({', '.join(skipped[:5])})"
                if skipped else "")
        shown = failed if keep_going else failed[:3]
        raise KdkitError(f"{len(failed)} sub-run(s) failed: {'; '.join(shown)}{more}; fix the "
                         "cause and continue with --resume (finished sub-runs are kept)")


def _start(task: Task, slot: int, cfg_path: Path, out_dir: Path, logs: Path, threads: int,
           gpus: int, cache_dir: Path | None, device: str | None
           ) -> tuple[subprocess.Popen[bytes], Path, float, int]:
    seed, label, _ = task
    # --resume: a sub-run stopped earlier (Ctrl-C) continues from its checkpoint; a finished
    # one is reused; the identity check refuses anything that is not this very run
    cmd = [sys.executable, "-m", "kdkit", "--threads", str(threads), "run", str(cfg_path),
           "--out", str(out_dir), "--only", f"seed{seed}/{label}", "--no-progress", "--resume"]
    cmd += ["--cache-dir", str(cache_dir)] if cache_dir is not None else ["--no-cache"]
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    if gpus:  # each job its own GPU (of those this process may use): it sees it as cuda:0
        env["CUDA_VISIBLE_DEVICES"] = _visible_gpus(gpus)[slot % gpus]
    if device is not None:
        cmd += ["--device", device]
    from kdkit.train import tensorboard

    if tensorboard.enabled():
        cmd.append("--tensorboard")
    path = logs / f"seed{seed}-{label}.log"
    with open(path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, path, time.perf_counter(), slot
