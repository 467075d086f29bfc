"""Teacher-output cache: per-sample views, exact cached losses, invalidation by hash."""

import gc
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from kdkit import files
from kdkit.data.arrays import ArrayDataset
from kdkit.data.augment import RandomShift, build_augment
from kdkit.data.loader import BatchLoader
from kdkit.data.views import make_views, sample_keys
from kdkit.distill import Distiller, build_method
from kdkit.errors import KdkitError
from kdkit.models import create_model
from kdkit.train import teacher_cache as tc
from kdkit.train.loop import LoopSettings, fit
from kdkit.train.teacher_cache import CacheSettings, TeacherCache


def _aug(digits, spec=None):
    return build_augment(spec or {"shift": 1, "hflip": True}, fill=digits.black)


def _teacher(seed=0, name="mlp", **kw):
    torch.manual_seed(seed)
    kw = kw or ({"hidden": [48]} if name == "mlp" else {})
    return create_model(name, input_size=8, **kw).eval()


def _kd(teacher, seed=1, method="kd", student="mlp", **kw):
    torch.manual_seed(seed)
    s = create_model(student, input_size=8, **(kw or ({"hidden": [16]} if student == "mlp" else {})))
    terms = build_method(method, s, {"teacher": teacher}, example_input=torch.zeros(2, 1, 8, 8))
    return Distiller(s, {"teacher": teacher}, terms)


def test_views_depend_on_sample_and_view_only(digits):
    aug = _aug(digits)
    batches = [torch.cat([x for x, _, _ in BatchLoader(digits.train, bs, shuffle=True, seed=s,
                                                        augment=aug, views=4).epoch_batches(0)])
               for bs, s in ((64, 3), (17, 3))]
    assert torch.equal(batches[0], batches[1])  # batch size does not change a sample's view
    x = digits.train.x[:40]
    keys = sample_keys(x)
    v = torch.tensor([0, 1, 2, 3] * 10)
    a = make_views(aug, x, keys, v)
    # the same (sample, view) pairs in another order and another batch give the same images
    perm = torch.randperm(40)
    b = make_views(aug, x[perm], keys[perm], v[perm])
    assert torch.equal(a[perm], b)
    # views really differ, from each other and from the original image
    other = make_views(aug, x, keys, (v + 1) % 4)
    assert (a != other).flatten(1).any(1).float().mean() > 0.5
    assert (a != x).flatten(1).any(1).float().mean() > 0.5


def test_view_mode_loader_picks_views_per_epoch_and_seed(digits):
    ld = BatchLoader(digits.train, 32, shuffle=True, seed=0, augment=_aug(digits), views=3)
    idx = torch.arange(len(digits.train))
    e0, e1 = ld.view_ids(0, idx), ld.view_ids(1, idx)
    assert set(e0.tolist()) == {0, 1, 2} and not torch.equal(e0, e1)
    other_seed = BatchLoader(digits.train, 32, shuffle=True, seed=1, augment=_aug(digits), views=3)
    assert not torch.equal(e0, other_seed.view_ids(0, idx))
    assert torch.equal(e0, ld.view_ids(0, idx))


def test_uniform_shift_covers_the_range():
    shift = RandomShift(2)
    x = torch.zeros(2, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0  # one bright pixel in the centre
    # u = 0 -> offset -2; u just below 1 -> offset +2 (rows then columns)
    out = shift.apply(x, torch.tensor([[0.0, 0.0], [0.9999, 0.9999]], dtype=torch.float64))
    assert out[0, 0, 0, 0] == 1.0 and out[1, 0, 4, 4] == 1.0


@pytest.mark.parametrize("method", ["kd", "overhaul"])
def test_cached_run_gives_the_live_losses(digits, tmp_path, method):
    """One epoch of training with the cache = the same epoch with the live teacher."""
    if method == "overhaul":
        teacher = _teacher(0, "plain_cnn4")
        make = lambda: _kd(teacher, method="overhaul", student="plain_cnn2")  # noqa: E731
    else:
        teacher = _teacher()
        make = lambda: _kd(teacher)  # noqa: E731
    aug = _aug(digits)
    settings = LoopSettings(epochs=2, lr=0.05, seed=3, log_every=1)
    loader = BatchLoader(digits.train, 64, shuffle=True, seed=3, augment=aug, views=3)
    live = make()
    res_live = fit(live, loader, settings, run_dir=tmp_path / "live", progress=False)
    cached_d = make()
    cache = TeacherCache.open_or_build(tmp_path / "cache", cached_d, digits.train, aug,
                                       CacheSettings(views=3, dtype="float32"))
    res_cached = fit(cached_d, loader, settings, run_dir=tmp_path / "cached", progress=False,
                     teacher_cache=cache)
    steps_live = (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()
    steps_cached = (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(steps_live, steps_cached, strict=True):
        la, lb = json.loads(a)["train/loss"], json.loads(b)["train/loss"]
        assert lb == pytest.approx(la, rel=1e-4, abs=1e-6)
    terms = [k for k in res_live.history[-1] if k.startswith("train/")]
    assert len(terms) >= 3
    for k in terms:
        assert res_cached.history[-1][k] == pytest.approx(res_live.history[-1][k], rel=1e-4)
    for p, q in zip(live.parameters(), cached_d.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_cache_outputs_equal_teacher_outputs(digits, tmp_path):
    teacher = _teacher()
    d = _kd(teacher)
    aug = _aug(digits)
    cache = TeacherCache.open_or_build(tmp_path, d, digits.train, aug, CacheSettings(views=2))
    idx = torch.tensor([5, 0, 99, 7, 5])
    view = torch.tensor([1, 0, 1, 1, 0])
    x = digits.train.x[idx]
    want = d.teacher_outputs(make_views(aug, x, sample_keys(x), view))["teacher"]
    got = cache.lookup(idx, view)["teacher"]
    assert set(got) == set(want) == {"<model>:output"}
    # float16 storage: the logits to half precision
    torch.testing.assert_close(got["<model>:output"], want["<model>:output"], rtol=1e-3, atol=2e-3)
    assert not torch.equal(got["<model>:output"][0], got["<model>:output"][4])  # two views


def test_topk_keeps_the_largest_logits(digits, tmp_path):
    teacher = _teacher()
    d = _kd(teacher)
    idx, view = torch.arange(30), torch.zeros(30, dtype=torch.long)
    full = d.teacher_outputs(digits.train.x[idx])["teacher"]["<model>:output"]
    exact = TeacherCache.open_or_build(tmp_path, d, digits.train, None,
                                       CacheSettings(dtype="float32", topk=10))
    torch.testing.assert_close(exact.lookup(idx, view)["teacher"]["<model>:output"], full)
    top3 = TeacherCache.open_or_build(tmp_path, d, digits.train, None,
                                      CacheSettings(dtype="float32", topk=3))
    got = top3.lookup(idx, view)["teacher"]["<model>:output"]
    vals, pos = full.topk(3, dim=1)
    torch.testing.assert_close(got.gather(1, pos), vals)
    rest_mean = (full.sum(1) - vals.sum(1)) / 7
    mask = torch.ones_like(full, dtype=torch.bool).scatter_(1, pos, False)
    torch.testing.assert_close(got[mask].view(30, 7), rest_mean[:, None].expand(30, 7))


def test_one_cache_serves_every_split_of_a_pool(digits, tmp_path, monkeypatch):
    """Another seed splits train+val differently; the cache over the pool serves it as is."""
    builds = _count_builds(monkeypatch)
    teacher = _teacher()
    aug = _aug(digits)
    pool = ArrayDataset(torch.cat([digits.train.x, digits.val.x]),
                        torch.cat([digits.train.y, digits.val.y]), "pool")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))
    split_a, split_b = pool.subset(perm[:700]), pool.subset(perm[300:])  # overlapping splits
    settings = CacheSettings(views=2, dtype="float32")
    ca = TeacherCache.open_or_build(tmp_path, _kd(teacher), split_a, aug, settings,
                                    pool=[split_a, pool.subset(perm[700:])])
    cb = TeacherCache.open_or_build(tmp_path, _kd(teacher), split_b, aug, settings,
                                    pool=[pool.subset(perm[:300]), split_b])
    assert builds["n"] == 1 and ca.folder == cb.folder
    # sample perm[400] is row 400 of split a and row 100 of split b: the same outputs
    v = torch.tensor([1])
    got_a = ca.lookup(torch.tensor([400]), v)["teacher"]["<model>:output"]
    got_b = cb.lookup(torch.tensor([100]), v)["teacher"]["<model>:output"]
    assert torch.equal(got_a, got_b)
    x = pool.x[perm[400:401]]
    want = _kd(teacher).teacher_outputs(make_views(aug, x, sample_keys(x), v))["teacher"]
    torch.testing.assert_close(got_a, want["<model>:output"])
    with pytest.raises(KdkitError, match="not in the teacher cache"):
        TeacherCache.open_or_build(tmp_path, _kd(teacher), split_b, aug, settings,
                                   pool=[split_a])


def _count_builds(monkeypatch):
    calls = {"n": 0}
    real = tc._build

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(tc, "_build", counting)
    return calls


def test_cache_is_reused_and_invalidated(digits, tmp_path, monkeypatch):
    builds = _count_builds(monkeypatch)
    aug = _aug(digits)
    teacher = _teacher()
    c1 = TeacherCache.open_or_build(tmp_path, _kd(teacher, seed=1), digits.train, aug,
                                    CacheSettings(views=2))
    # another student and seed, same teacher/data/augmentation: reused
    c2 = TeacherCache.open_or_build(tmp_path, _kd(teacher, seed=9, hidden=[8]), digits.train,
                                    aug, CacheSettings(views=2))
    assert builds["n"] == 1 and c1.folder == c2.folder
    # each change makes another cache
    with torch.no_grad():
        changed = _teacher()
        changed.fc_out.bias[0] += 1e-3
    variants = [
        (changed, digits.train, aug, CacheSettings(views=2)),
        (teacher, ArrayDataset(digits.train.x * 1.01, digits.train.y, "d"), aug,
         CacheSettings(views=2)),
        (teacher, digits.train, _aug(digits, {"shift": 2}), CacheSettings(views=2)),
        (teacher, digits.train, aug, CacheSettings(views=3)),
        (teacher, digits.train, aug, CacheSettings(views=2, dtype="float32")),
    ]
    folders = {c1.folder}
    for t, data, a, s in variants:
        folders.add(TeacherCache.open_or_build(tmp_path, _kd(t), data, a, s).folder)
    assert builds["n"] == 1 + len(variants) and len(folders) == 1 + len(variants)
    # the cache of a changed teacher holds that teacher's outputs, not the old ones
    idx, v = torch.arange(8), torch.zeros(8, dtype=torch.long)
    new = TeacherCache.open_or_build(tmp_path, _kd(changed), digits.train, aug,
                                     CacheSettings(views=2))
    assert not torch.equal(new.lookup(idx, v)["teacher"]["<model>:output"],
                           c1.lookup(idx, v)["teacher"]["<model>:output"])


def test_wrong_or_torn_cache_is_rebuilt(digits, tmp_path, monkeypatch):
    builds = _count_builds(monkeypatch)
    d = _kd(_teacher())
    c = TeacherCache.open_or_build(tmp_path, d, digits.train, None, CacheSettings())
    manifest = c.folder / tc.MANIFEST
    doc = json.loads(manifest.read_text())
    doc["identity"]["teachers"]["teacher"] = "0" * 64  # a manifest of another teacher
    manifest.write_text(json.dumps(doc))
    TeacherCache.open_or_build(tmp_path, d, digits.train, None, CacheSettings())
    assert builds["n"] == 2
    next(c.folder.glob("*.npy")).unlink()  # a missing array file
    again = TeacherCache.open_or_build(tmp_path, d, digits.train, None, CacheSettings())
    assert builds["n"] == 3
    assert json.loads((again.folder / tc.MANIFEST).read_text())["identity"] == c.manifest["identity"]


def test_build_crash_leaves_no_cache(digits, tmp_path, monkeypatch):
    d = _kd(_teacher())
    monkeypatch.setattr(tc, "atomic_write_json", lambda *a: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        TeacherCache.open_or_build(tmp_path, d, digits.train, None, CacheSettings())
    assert list(tmp_path.iterdir()) == []


def test_bad_cache_settings_name_the_fix(digits, tmp_path):
    teacher = _teacher()
    with pytest.raises(KdkitError, match="set views to 1"):
        TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train, None,
                                   CacheSettings(views=2))
    s = create_model("mlp", input_size=8, hidden=[8])
    d = Distiller(s, {"teacher": teacher}, build_method("kd", s, {"teacher": teacher}),
                  teacher_mode="train")
    with pytest.raises(KdkitError, match="teacher_mode 'eval'"):
        TeacherCache.open_or_build(tmp_path, d, digits.train, None, CacheSettings())
    with pytest.raises(KdkitError, match="views must be >= 1"):
        CacheSettings(views=0)
    cache = TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train, None, CacheSettings())
    loader = BatchLoader(digits.train, 64, shuffle=True)  # batch mode, not view mode
    with pytest.raises(KdkitError, match="views=1"):
        fit(_kd(teacher), loader, LoopSettings(epochs=1), progress=False, teacher_cache=cache)


def test_cached_run_resumes_to_identical_weights(digits, tmp_path):
    teacher = _teacher()
    aug = _aug(digits)
    settings = LoopSettings(epochs=2, lr=0.05, seed=4)
    loader = BatchLoader(digits.train, 64, shuffle=True, seed=4, augment=aug, views=2)
    cache = TeacherCache.open_or_build(tmp_path / "c", _kd(teacher), digits.train, aug,
                                       CacheSettings(views=2))
    full = _kd(teacher)
    fit(full, loader, settings, run_dir=tmp_path / "a", progress=False, teacher_cache=cache)
    part = _kd(teacher)
    with pytest.raises(KdkitError, match="continue with --resume"):
        fit(part, loader, settings, run_dir=tmp_path / "b", progress=False, teacher_cache=cache,
            stop_after=20)
    again = _kd(teacher, seed=7)  # other init: the checkpoint must overwrite it
    fit(again, loader, settings, run_dir=tmp_path / "b", progress=False, teacher_cache=cache,
        resume=True)
    for p, q in zip(full.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------- integrity, races, temporaries, permissions


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _all_outputs(cache):
    idx = torch.arange(len(cache.rows))
    return [cache.lookup(idx, torch.full_like(idx, v))["teacher"]["<model>:output"]
            for v in range(cache.views)]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_array_is_rebuilt(digits, tmp_path, monkeypatch, damage):
    builds = _count_builds(monkeypatch)
    teacher, aug, settings = _teacher(), _aug(digits), CacheSettings(views=2, dtype="float32")
    c = TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train, aug, settings)
    before = _all_outputs(c)
    (npy,) = c.folder.glob("*.npy")
    folder = c.folder
    del c  # close its memory maps before damaging the file under them
    gc.collect()
    size = npy.stat().st_size
    if damage == "truncate":
        with open(npy, "r+b") as f:
            f.truncate(size - size // 3)
    else:  # same size, a few bytes in the middle of the data flipped
        with open(npy, "r+b") as f:
            f.seek(size // 2)
            chunk = f.read(16)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
    logs = []
    again = TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train, aug, settings,
                                       log=logs.append)
    assert builds["n"] == 2 and again.folder == folder
    assert any(("truncated" if damage == "truncate" else "SHA-256") in line for line in logs)
    for a, b in zip(before, _all_outputs(again), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # nothing left aside
    check = again.manifest["arrays"][npy.name]  # what the manifest records of each array
    assert check["bytes"] == npy.stat().st_size == size
    assert check["sha256"] == hashlib.sha256(npy.read_bytes()).hexdigest()


@pytest.mark.parametrize("when", ["during_build", "at_rename"])
def test_second_builder_never_replaces_a_published_cache(digits, tmp_path, monkeypatch, when):
    """Two processes build the same cache; the one finishing second keeps the first's."""
    builds = _count_builds(monkeypatch)
    teacher, settings = _teacher(), CacheSettings(dtype="float32")
    first: dict = {}

    def first_process_publishes():
        first["started"] = True
        first["cache"] = c = TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train,
                                                        None, settings)
        first["inodes"] = {p.name: p.stat().st_ino for p in c.folder.iterdir()}
        first["outputs"] = _all_outputs(c)

    d = _kd(teacher)
    if when == "during_build":  # the first publishes while the second runs its teacher
        real_outputs = d.teacher_outputs

        def hooked(x):
            if not first:
                first_process_publishes()
            return real_outputs(x)

        monkeypatch.setattr(d, "teacher_outputs", hooked)
    else:  # ... or just before the second renames its folder into place
        real_publish = tc.files.publish_dir

        def racing(tmp, target):
            if not first:
                first_process_publishes()
            return real_publish(tmp, target)

        monkeypatch.setattr(tc.files, "publish_dir", racing)
    logs = []
    second = TeacherCache.open_or_build(tmp_path, d, digits.train, None, settings,
                                        log=logs.append)
    c = first["cache"]
    assert builds["n"] == 2 and second.folder == c.folder
    assert {p.name: p.stat().st_ino for p in c.folder.iterdir()} == first["inodes"]
    for a, b, want in zip(_all_outputs(c), _all_outputs(second), first["outputs"], strict=True):
        assert torch.equal(a, want) and torch.equal(b, want)
    assert any("another process" in line for line in logs)
    assert [p.name for p in tmp_path.iterdir()] == [c.folder.name]  # the loser's copy is gone


def test_invalid_cache_is_set_aside_while_its_readers_keep_reading(digits, tmp_path):
    teacher, settings = _teacher(), CacheSettings(dtype="float32")
    reader = TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train, None, settings)
    before = _all_outputs(reader)
    (npy,) = reader.folder.glob("*.npy")
    old_inode = npy.stat().st_ino
    (reader.folder / tc.MANIFEST).write_text("{not json")  # a corrupt manifest
    logs = []
    new = TeacherCache.open_or_build(tmp_path, _kd(teacher), digits.train, None, settings,
                                     log=logs.append)
    assert any("corrupt manifest" in line and "rebuilding" in line for line in logs)
    assert npy.stat().st_ino != old_inode  # replaced, not rewritten in place
    for a, b, c in zip(before, _all_outputs(reader), _all_outputs(new), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)  # the old reader still reads
    assert [p.name for p in tmp_path.iterdir()] == [new.folder.name]


def test_temporaries_of_killed_builds_are_removed(digits, tmp_path):
    dead = tmp_path / f".0123abcd.{files._HOST}-{_dead_pid()}.x1y2.tmp"
    live = tmp_path / f".4567cdef.{files._HOST}-{os.getpid()}.z3w4.tmp"  # a build running now
    for folder in (dead, live):
        folder.mkdir()
        (folder / "teacher.0.full.npy").write_bytes(b"\0" * 1024)
    TeacherCache.open_or_build(tmp_path, _kd(_teacher()), digits.train, None, CacheSettings())
    assert not dead.exists() and live.is_dir()
    dead.mkdir()
    TeacherCache.open_or_build(tmp_path, _kd(_teacher()), digits.train, None, CacheSettings())
    assert not dead.exists()  # also when the cache is only opened


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_cache_files_follow_the_umask(digits, tmp_path, monkeypatch, mask):
    old = os.umask(mask)
    try:
        monkeypatch.setattr(files, "_umask", None)  # files reads the umask once
        c = TeacherCache.open_or_build(tmp_path / "cache", _kd(_teacher()), digits.train, None,
                                       CacheSettings())
    finally:
        os.umask(old)
    assert c.folder.stat().st_mode & 0o777 == 0o777 & ~mask
    names = sorted(p.name for p in c.folder.iterdir())
    assert tc.MANIFEST in names and len(names) >= 2
    for p in c.folder.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


def test_build_reports_progress(digits, tmp_path, monkeypatch):
    from tqdm import tqdm


    bars = []

    def recording_bar(**kw):  # as on a terminal, but into a buffer
        bar = tqdm(file=io.StringIO(), **kw)
        bars.append((kw, bar))
        return bar

    from kdkit import progress

    monkeypatch.setattr(progress, "progress_bar", recording_bar)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    logs = []
    aug = _aug(digits)
    TeacherCache.open_or_build(tmp_path, _kd(_teacher()), digits.train, aug,
                               CacheSettings(views=3), batch_size=100, log=logs.append)
    n = len(digits.train)
    ((kw, bar),) = bars
    assert kw["total"] == 3 * n and bar.n == 3 * n and kw["desc"] == "teacher cache"
    assert len(logs) == 2
    assert "is new; building 3 view(s)" in logs[0]
    assert f"{3 * n} rows" in logs[1] and "built in" in logs[1]
    logs.clear()  # opening a built cache builds nothing and says nothing
    TeacherCache.open_or_build(tmp_path, _kd(_teacher()), digits.train, aug,
                               CacheSettings(views=3), log=logs.append)
    assert logs == [] and len(bars) == 1


@pytest.mark.parametrize("topk", [None, 3])
def test_placed_cache_gives_the_memory_mapped_lookups(digits, tmp_path, topk):
    """A cache placed on a device (here forced onto the CPU) gathers there and returns what
    the memory-mapped lookup returns, in every view, for full and top-k storage."""
    d = _kd(_teacher())
    cache = TeacherCache.open_or_build(tmp_path, d, digits.train, _aug(digits),
                                       CacheSettings(views=3, topk=topk))
    idx = torch.tensor([5, 0, 99, 7, 5, len(digits.train.x) - 1])
    view = torch.tensor([1, 0, 2, 1, 0, 2])
    want = cache.lookup(idx, view)
    cache.place(torch.device("cpu"), force=True)
    assert cache._placed is not None
    got = cache.lookup(idx, view)
    assert torch.equal(got["teacher"]["<model>:output"], want["teacher"]["<model>:output"])
    cache.place(torch.device("cpu"))  # back to the memory-mapped arrays
    assert cache._placed is None
    assert torch.equal(cache.lookup(idx, view)["teacher"]["<model>:output"],
                       want["teacher"]["<model>:output"])
