"""Shared file systems: every file written follows the umask; a second, unprivileged user
checks, caches and trains on a dataset that root fetched and cached, adopts a read-only tree
in place, and gets one-line errors (exit 2) where it may not write.

CI runs tests as root, whom permissions do not stop, so the second user is a real one
(created with useradd when missing) and its commands run through setpriv; without root
those tests are skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from omniad.atomic import atomic_file, write_bytes_atomic, write_json_atomic
from omniad.data.cache import build_cache
from omniad.data.demo import make_demo
from omniad.data.fetch import fetch_dataset
from omniad.data.manifest import MANIFEST_NAME

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path

REPO = Path(__file__).resolve().parent.parent
PEER = "omniad-peer"
SMALL = {"n_train": 3, "n_test_good": 2, "n_per_defect": 1, "size": 64}


def _quiet(msg: str) -> None:
    pass


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of everything under root (links not followed)."""
    out = set()
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        out.add(("dir" if stat.S_ISDIR(st.st_mode) else "file", stat.S_IMODE(st.st_mode)))
    return out


def test_every_writer_follows_the_umask(tmp_path: Path, umask022: None) -> None:
    from omniad.engine.checkpoint import atomic_torch_save
    from omniad.report.latex import write_atomic

    write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    write_bytes_atomic(tmp_path / "log.txt", "x")
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    write_atomic(tmp_path / "report.tex", "\\relax")
    for name in ("metrics.json", "log.txt", "checkpoint.pt", "report.tex"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    os.umask(0o002)  # a group-shared project directory
    with atomic_file(tmp_path / "group.txt") as fh:
        fh.write("g")
    assert stat.S_IMODE((tmp_path / "group.txt").stat().st_mode) == 0o664
    os.umask(0o022)
    demo = make_demo(tmp_path / "data" / "demo", seed=0, **SMALL)
    cache = build_cache("demo", demo, 16, tmp_path / "cache" / "demo-16", log=_quiet)
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(fx.tar_bytes(fx.mvtec_files()))
    fetch_dataset("mvtec_ad", tmp_path / "data" / "mvtec_ad", fx.mvtec_params(None, None),
                  source=archive, trust_first_download=True, log=_quiet)
    for root in (demo, cache, tmp_path / "data" / "mvtec_ad", tmp_path / "checksums"):
        assert _modes(root) <= {("dir", 0o755), ("file", 0o644)}, root


# --------------------------------------------------------------------------------------------
# a second, unprivileged user
# --------------------------------------------------------------------------------------------


def _peer() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second, unprivileged user")
    try:
        return pwd.getpwnam(PEER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None or shutil.which("setpriv") is None:
        pytest.skip("useradd/setpriv not available")
    proc = subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                           "/usr/sbin/nologin", PEER], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot create user {PEER}: {proc.stderr.strip()}")
    return pwd.getpwnam(PEER)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-readable directory (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="omniad-shared-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_peer(peer: pwd.struct_passwd, home: Path, *args: str, **env: str
             ) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "MPLCONFIGDIR": str(home / "mpl"), "OMNIAD_CHECKSUMS": str(home / "checksums")}
    cmd = ["setpriv", f"--reuid={peer.pw_uid}", f"--regid={peer.pw_gid}", "--clear-groups",
           "--", sys.executable, "-m", "omniad.cli", *args]
    return subprocess.run(cmd, env={**base, **env}, cwd=home, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def fetched_by_root(shared: Path, umask022: None) -> dict[str, Path]:
    """What root left on the shared file system: a fetched MVTec tree, the demo set, its
    cache, a read-only extracted tree, the params file."""
    import yaml

    archive = fx.tar_bytes(fx.mvtec_files())
    params = fx.mvtec_params(None, fx.sha256(archive))
    pfile = shared / "datasets.yaml"
    pfile.write_text(yaml.safe_dump(params))
    (shared / "dl").mkdir()
    (shared / "dl" / "a.tar.xz").write_bytes(archive)
    mvtec = shared / "data" / "mvtec_ad"
    fetch_dataset("mvtec_ad", mvtec, params, source=shared / "dl" / "a.tar.xz", log=_quiet)
    demo = make_demo(shared / "data" / "demo", seed=0, **SMALL)
    build_cache("demo", demo, 64, shared / "cache" / "demo-64", log=_quiet)
    tree = fx.write_tree(shared / "trees" / "mvtec", fx.mvtec_files(seed=2))
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return {"params": pfile, "mvtec": mvtec, "demo": demo, "tree": tree,
            "shared": shared}


@pytest.fixture
def peer_home(shared: Path) -> tuple[pwd.struct_passwd, Path]:
    peer = _peer()
    home = shared / "peer"
    home.mkdir()
    os.chown(home, peer.pw_uid, peer.pw_gid)
    return peer, home


def test_second_user_checks_caches_and_adopts(
    fetched_by_root: dict[str, Path], peer_home: tuple[pwd.struct_passwd, Path]
) -> None:
    peer, home = peer_home
    got = fetched_by_root
    pf = str(got["params"])
    for args in (("check", "mvtec_ad", "--root", str(got["mvtec"]), "--params", pf),
                 ("check", "demo", "--root", str(got["demo"])),
                 ("cache", "mvtec_ad", "--root", str(got["mvtec"]), "--size", "16", "--out",
                  str(home / "cache" / "mvtec_ad-16"), "--params", pf),
                 ("cache", "demo", "--root", str(got["demo"]), "--size", "64", "--out",
                  str(home / "cache" / "demo-64"))):
        proc = _as_peer(peer, home, "data", *args, "-q")
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    assert (home / "cache" / "demo-64" / "cache_key.json").stat().st_uid == peer.pw_uid
    # a read-only extracted tree, used where it is: decoded, counted, linked, cached
    before = sorted(p.name for p in got["tree"].rglob("*"))
    proc = _as_peer(peer, home, "data", "fetch", "mvtec_ad", "--root",
                    str(home / "data" / "mvtec_ad"), "--source", str(got["tree"]),
                    "--in-place", "--params", pf, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "files decoded and counted" in proc.stdout
    assert (home / "data" / "mvtec_ad" / "bottle").resolve() == got["tree"] / "bottle"
    assert sorted(p.name for p in got["tree"].rglob("*")) == before  # nothing written there
    proc = _as_peer(peer, home, "data", "cache", "mvtec_ad", "--root",
                    str(home / "data" / "mvtec_ad"), "--size", "16", "--out",
                    str(home / "cache" / "adopted-16"), "--params", pf, "-q")
    assert proc.returncode == 0, proc.stderr


def test_second_user_gets_one_line_errors_where_it_may_not_write(
    fetched_by_root: dict[str, Path], peer_home: tuple[pwd.struct_passwd, Path]
) -> None:
    peer, home = peer_home
    got = fetched_by_root
    pf = str(got["params"])
    src = str(got["shared"] / "dl" / "a.tar.xz")
    cases = {
        # read-only parent of --root
        "root": (("data", "fetch", "mvtec_ad", "--root", str(got["shared"] / "data" / "new"),
                  "--source", src, "--params", pf), got["shared"] / "data"),
        # unwritable --downloads
        "downloads": (("data", "fetch", "mvtec_ad", "--root", str(home / "m"), "--downloads",
                       str(got["shared"] / "dl"), "--url", "http://127.0.0.1:9/a.tar.xz",
                       "--params", pf), got["shared"] / "dl"),
        # unwritable --out
        "out": (("data", "cache", "demo", "--root", str(got["demo"]), "--size", "16", "--out",
                 str(got["shared"] / "cache" / "demo-16")), got["shared"] / "cache"),
        # replacing root's tree in a root-owned directory
        "refetch": (("data", "fetch", "mvtec_ad", "--root", str(got["mvtec"]), "--source",
                     str(got["tree"]), "--params", pf), got["shared"] / "data"),
    }
    for case, (args, where) in cases.items():
        proc = _as_peer(peer, home, *args, "-q")
        err = proc.stderr
        assert proc.returncode == 2, (case, proc.stdout[-1500:], err[-1500:])
        assert err.count("\n") == 1 and "Traceback" not in err, (case, err)
        assert err.startswith(f"error: {where}") and "Permission denied" in err, (case, err)
    assert (got["mvtec"] / MANIFEST_NAME).is_file()  # root's tree untouched


@pytest.mark.slow
def test_second_user_trains_on_the_shared_dataset(
    fetched_by_root: dict[str, Path], peer_home: tuple[pwd.struct_passwd, Path]
) -> None:
    from conftest import write_tiny_params

    peer, home = peer_home
    got = fetched_by_root
    params_dir = write_tiny_params(got["shared"] / "params", epochs=1)
    proc = _as_peer(peer, home, "data", "cache", "demo", "--root", str(got["demo"]),
                    "--size", "64", "--out", str(home / "cache" / "demo-64"), "-q")
    assert proc.returncode == 0, proc.stderr
    env = {"OMNIAD_PARAMS": str(params_dir), "OMNIAD_RESULTS": str(home / "results"),
           "OMNIAD_CACHE": str(home / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns.db'}"}
    proc = _as_peer(peer, home, "train", "tiny/demo/omniad/default/42", **env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    run = home / "results/tiny/runs/demo/omniad/default/seed42"
    model = run / "model.pt"
    assert model.stat().st_uid == peer.pw_uid
    assert stat.S_IMODE(model.stat().st_mode) == 0o644  # readable by the rest of the team
    assert stat.S_IMODE((run / "train.json").stat().st_mode) == 0o644
