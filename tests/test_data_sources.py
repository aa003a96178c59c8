"""Sources in order with a manual route, checksum locks, crash-safe installs, tar truncation.

Everything is served from 127.0.0.1 (tests/data_fixtures.py); crashes are real process
deaths (os._exit in a forked child), so no cleanup handler runs.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shlex
from pathlib import Path

import pytest

from omniad.data.check import check_dataset
from omniad.data.cli import _add_subcommands, main
from omniad.data.fetch import archive_specs, fetch_dataset, safe_extract, trust_option
from omniad.data.manifest import MANIFEST_NAME, provenance, read_manifest
from omniad.data.samples import ArchiveError, DatasetError

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path

MVTEC = "mvtec_anomaly_detection.tar.xz"
REPO = Path(__file__).resolve().parent.parent


def _quiet(msg: str) -> None:
    pass


def parses(command: str) -> bool:
    """Whether the CLI's own parser accepts a suggested `omniad data ...` command."""
    import argparse

    words = shlex.split(command)
    assert words[:2] == ["omniad", "data"], command
    parser = argparse.ArgumentParser(exit_on_error=False)
    _add_subcommands(parser)
    try:
        parser.parse_args(words[2:])
    except (argparse.ArgumentError, SystemExit):
        return False
    return True


@pytest.fixture(scope="module")
def mvtec_archive() -> bytes:
    return fx.tar_bytes(fx.mvtec_files())


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def test_mvtec_sources_current_url_first_then_older_ones() -> None:
    spec = archive_specs("mvtec_ad")[0]
    assert spec.urls[0].startswith("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c")
    assert spec.urls[1].startswith("https://www.mydrive.ch/shares/38536/")
    assert spec.sha256 == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"


def test_first_source_404_then_mirror_verified(
    tmp_path: Path, mvtec_archive: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fx.ServerState(files={f"/mirror/{MVTEC}": mvtec_archive})
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/dead/{MVTEC}", fx.sha256(mvtec_archive))
        monkeypatch.setenv("OMNIAD_DATA_MIRROR", f"{base}/mirror")
        manifest = fetch_dataset("mvtec_ad", tmp_path / "m", params, retry_wait=0,
                                 log=logs.append)
    assert [r["path"] for r in state.requests] == [f"/dead/{MVTEC}", f"/mirror/{MVTEC}"]
    failed = [m for m in logs if "source failed" in m]
    assert len(failed) == 1 and f"{base}/dead/{MVTEC}: HTTP 404" in failed[0]
    assert manifest["archives"][0]["url"] == f"{base}/mirror/{MVTEC}"
    assert manifest["archives"][0]["sha256"] == fx.sha256(mvtec_archive)
    assert check_dataset("mvtec_ad", tmp_path / "m", params=params).ok


def test_mirror_with_wrong_file_is_skipped_and_kept_aside(
    tmp_path: Path, mvtec_archive: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fx.ServerState(files={f"/bad/{MVTEC}": b"not it" * 100,
                                  f"/good/{MVTEC}": mvtec_archive})
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/bad/{MVTEC}", fx.sha256(mvtec_archive))
        monkeypatch.setenv("OMNIAD_DATA_MIRROR", f"{base}/good/")
        fetch_dataset("mvtec_ad", tmp_path / "m", params, retry_wait=0, log=logs.append)
    assert any("SHA-256 mismatch" in m and "source failed" in m for m in logs)
    # the verified archive is in hand, so the set-aside wrong one is gone
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [MVTEC]


def test_local_directory_mirror_is_used_in_place(
    tmp_path: Path, mvtec_archive: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / MVTEC).write_bytes(mvtec_archive)
    params = fx.mvtec_params("http://127.0.0.1:9/refused", fx.sha256(mvtec_archive))
    monkeypatch.setenv("OMNIAD_DATA_MIRROR", str(shelf))
    manifest = fetch_dataset("mvtec_ad", tmp_path / "m", params, retry_wait=0, log=_quiet)
    assert manifest["archives"][0]["url"] == str(shelf / MVTEC)
    assert not (tmp_path / "downloads" / MVTEC).exists()  # read where it is, not copied


def test_all_sources_dead_ends_with_the_manual_route(
    tmp_path: Path, mvtec_archive: bytes, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import yaml

    state = fx.ServerState(files={})
    sha = fx.sha256(mvtec_archive)
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/gone/{MVTEC}", sha)
        params["datasets"]["mvtec_ad"]["archives"][0]["urls"] = [f"{base}/older/{MVTEC}"]
        params["mirrors"] = [f"{base}/mirror"]
        pfile = tmp_path / "datasets.yaml"
        pfile.write_text(yaml.safe_dump(params))
        root = tmp_path / "m"
        rc = main(["fetch", "mvtec_ad", "--root", str(root), "--params", str(pfile), "-q"])
    out, err = capsys.readouterr()
    assert rc == 2
    failed = [line for line in out.splitlines() if "source failed" in line]
    assert [re.search(r"(/\w+)/" + re.escape(MVTEC), f).group(1) for f in failed] == [
        "/older", "/gone", "/mirror"]  # urls, then the legacy url, then the mirror
    assert all("HTTP 404" in f for f in failed)
    route = err.strip()
    assert route.count("\n") == 0 and "Manual route" in route
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in route
    assert f"download {MVTEC} (SHA-256 {sha})" in route
    command = route.split("then run: ")[1]
    assert command == (f"omniad data fetch mvtec_ad --root {root} --source "
                       f"{tmp_path / 'downloads'} --params {pfile}")
    assert parses(command)
    # following the route works: the archive saved by hand where it says
    (tmp_path / "downloads" / MVTEC).write_bytes(mvtec_archive)
    assert main(shlex.split(command)[2:] + ["-q"]) == 0


def test_rerun_on_complete_verified_tree_needs_no_network(
    tmp_path: Path, mvtec_archive: bytes
) -> None:
    state = fx.ServerState(files={f"/{MVTEC}": mvtec_archive})
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", fx.sha256(mvtec_archive))
        first = fetch_dataset("mvtec_ad", tmp_path / "m", params, retry_wait=0, log=_quiet)
    (tmp_path / "downloads" / MVTEC).unlink()  # archives removed to save space; server gone
    again = fetch_dataset("mvtec_ad", tmp_path / "m", params, retry_wait=0, log=_quiet)
    assert again == first and len(state.requests) == 1


# --------------------------------------------------------------------------------------------
# hashes: pinned, or the lock written on first trust
# --------------------------------------------------------------------------------------------


def test_first_trust_writes_the_lock_then_it_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_checksums: Path
) -> None:
    archives = fx.realiad_archives()
    state = fx.ServerState(files={f"/{k}": v for k, v in archives.items()})
    monkeypatch.setenv("HF_TOKEN", "t")
    with fx.serve(state) as base:
        params = fx.realiad_params(base)
        assert trust_option("real_iad", params) == "--trust-first-download"
        first = fetch_dataset("real_iad", tmp_path / "r", params, trust_first_download=True,
                              retry_wait=0, log=_quiet)
        lock = fx.read_lock_file(isolated_checksums / "real_iad.sha256")
        assert lock == {k: fx.sha256(v) for k, v in archives.items()}
        assert trust_option("real_iad", params) == ""  # the DAG stops passing the option
        assert {a["sha256_origin"] for a in first["archives"]} == {"trusted-first-download"}
        # another machine, same lock: verified, no trust needed; a changed file is refused
        state.files["/realiad_256/pcb.zip"] = fx.realiad_archives(seed=5)["realiad_256/pcb.zip"]
        with pytest.raises(DatasetError, match="Manual route") as err:
            fetch_dataset("real_iad", tmp_path / "r2", params, downloads=tmp_path / "dl2",
                          retry_wait=0, log=_quiet)
        assert lock["realiad_256/pcb.zip"] in str(err.value)
    assert "first-trust lock" in provenance(tmp_path / "r")


def test_pinned_hash_needs_no_trust_and_says_so(tmp_path: Path, mvtec_archive: bytes) -> None:
    assert trust_option("mvtec_ad") == "" and trust_option("dtd") == ""
    assert trust_option("visa") == "" and trust_option("demo") == ""
    src = tmp_path / MVTEC
    src.write_bytes(mvtec_archive)
    fetch_dataset("mvtec_ad", tmp_path / "m", fx.mvtec_params(None, fx.sha256(mvtec_archive)),
                  source=src, log=_quiet)
    assert provenance(tmp_path / "m") == "archives verified against SHA-256 pinned in params"
    assert provenance(tmp_path / "none") == "not fetched here"


def test_dag_passes_the_trust_option_from_the_lock_state() -> None:
    rule = (REPO / "workflow/rules/data.smk").read_text()
    assert "trust=lambda wc: trust_option(wc.dataset)" in rule
    assert "{params.trust}" in rule.split("rule fetch:")[1].split("rule ")[0]


# --------------------------------------------------------------------------------------------
# truncation and crashes
# --------------------------------------------------------------------------------------------


def test_plain_tar_cut_at_a_file_boundary_is_refused(tmp_path: Path) -> None:
    files = fx.mvtec_files()
    whole = fx.tar_bytes(files, mode="w")
    # headers + padded data of every member but the last ones: a cut between two members
    import tarfile

    with tarfile.open(fileobj=__import__("io").BytesIO(whole)) as tf:
        members = tf.getmembers()
    boundary = members[len(members) // 2].offset
    cut = whole[:boundary]
    state = fx.ServerState(files={f"/{MVTEC}": cut})
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", None)  # no hash: only the tar can tell
        with pytest.raises(ArchiveError, match="truncated archive: no end-of-archive marker"):
            fetch_dataset("mvtec_ad", tmp_path / "m", params, trust_first_download=True,
                          retry_wait=0, log=_quiet)
    assert not (tmp_path / "m").exists() and fx.leftovers(tmp_path) == []
    assert not (tmp_path / "checksums").exists()  # a refused archive is never locked
    # kept aside, so the next run downloads again instead of trusting it from disk
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [
        f"{MVTEC}.unverified-{fx.sha256(cut)[:12]}"]
    (tmp_path / "ok.tar").write_bytes(whole)
    safe_extract(tmp_path / "ok.tar", tmp_path / "out")  # the whole one passes
    assert (tmp_path / "out/bottle/train/good/000.png").is_file()


class _Crash:
    """Kill the process (no cleanup runs) at the n-th step of install_tree."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0
        self.rename, self.rmtree = os.rename, __import__("shutil").rmtree

    def tick(self) -> None:
        if self.seen == self.step:
            os._exit(77)
        self.seen += 1

    def fake_rename(self, a, b) -> None:  # noqa: ANN001 - os.rename's signature
        self.tick()
        self.rename(a, b)

    def fake_rmtree(self, path, ignore_errors=False) -> None:  # noqa: ANN001
        if self.seen + 1 == self.step:  # die half-way through deleting the old tree
            for victim in sorted(Path(path).rglob("*.png"))[:3]:
                victim.unlink()
            os._exit(77)
        self.tick()
        self.rmtree(path, ignore_errors=ignore_errors)


def _crashing_fetch(step: int, root: str, params: dict, src: str) -> None:
    import omniad.atomic

    crash = _Crash(step)
    omniad.atomic.os.rename = crash.fake_rename  # the child dies anyway: no undo needed
    omniad.atomic.shutil.rmtree = crash.fake_rmtree
    fetch_dataset("mvtec_ad", root, params, source=src, log=_quiet)
    os._exit(0)


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_crash_between_install_steps_leaves_a_recoverable_tree(
    tmp_path: Path, mvtec_archive: bytes, step: int
) -> None:
    """Steps: 0 = before moving the old tree aside, 1 = before moving the new one in,
    2 = before deleting the old one, 3 = half-way through deleting it."""
    old_src, new_src = tmp_path / "v1.tar.xz", tmp_path / "v2.tar.xz"
    old_src.write_bytes(mvtec_archive)
    new_bytes = fx.tar_bytes(fx.mvtec_files(seed=1))
    new_src.write_bytes(new_bytes)
    root = tmp_path / "data" / "mvtec_ad"
    p_old = fx.mvtec_params(None, fx.sha256(mvtec_archive))
    p_new = fx.mvtec_params(None, fx.sha256(new_bytes))
    before = fetch_dataset("mvtec_ad", root, p_old, source=old_src, log=_quiet)

    child = multiprocessing.get_context("fork").Process(
        target=_crashing_fetch, args=(step, str(root), p_new, str(new_src)))
    child.start()
    child.join(60)
    assert child.exitcode == 77
    # at every step some complete tree (old or new) exists at root or beside it
    beside = [p for p in root.parent.iterdir() if p.name.startswith(".mvtec_ad.")]
    complete = [p for p in [root, *beside] if (p / MANIFEST_NAME).is_file()]
    assert complete, (step, sorted(p.name for p in root.parent.iterdir()))

    logs: list[str] = []
    after = fetch_dataset("mvtec_ad", root, p_new, source=new_src, log=logs.append)
    assert read_manifest(root) == after and after["tree_sha256"] != before["tree_sha256"]
    assert check_dataset("mvtec_ad", root, params=p_new).ok
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".")] == []
    if step == 1:  # the complete new tree was put in place, not extracted again
        assert any("recovered" in m for m in logs)
        assert not any("extracting" in m for m in logs)


def test_report_provenance_names_pinned_and_lock_datasets(
    tmp_path: Path, mvtec_archive: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniad.grid import load_params
    from omniad.report import aggregate as agg
    from omniad.report.build import report_context

    data = tmp_path / "data"
    src = tmp_path / MVTEC
    src.write_bytes(mvtec_archive)
    fetch_dataset("mvtec_ad", data / "mvtec_ad", fx.mvtec_params(None, fx.sha256(mvtec_archive)),
                  source=src, log=_quiet)
    hub = fx.write_tree(tmp_path / "hub", fx.realiad_archives())
    fetch_dataset("real_iad", data / "real_iad", fx.realiad_params(None), source=hub,
                  trust_first_download=True, log=_quiet)
    monkeypatch.setenv("OMNIAD_DATA", str(data))
    line = report_context(agg.Collection(load_params(), "paper", []), [], {})["data"]
    assert line == ("MVTec-AD: archives verified against SHA-256 pinned in params; "
                    "VisA: not fetched here; Real-IAD: archives verified against the "
                    "first-trust lock (params/checksums/real\\_iad.sha256)")


def test_recovery_never_deletes_the_only_complete_copy(tmp_path: Path) -> None:
    from omniad.atomic import recover_tree, remove_stale

    root = tmp_path / "d"
    old = fx.write_tree(tmp_path / ".d.old-1", {MANIFEST_NAME: b"{}", "a.png": b"a"})
    partial = fx.write_tree(tmp_path / ".d.tmp-2", {"b.png": b"b"})  # killed mid-extraction
    logs: list[str] = []
    recover_tree(root, lambda p: (p / MANIFEST_NAME).is_file(), MANIFEST_NAME, logs.append)
    assert (root / "a.png").read_bytes() == b"a" and not old.exists() and not partial.exists()
    assert any("recovered" in m for m in logs)
    # a half-deleted old tree (marker gone first) never comes back in place of a good root
    fx.write_tree(tmp_path / ".d.old-3", {"a.png": b"stale"})
    remove_stale(root, MANIFEST_NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert (root / "a.png").read_bytes() == b"a"
