"""Helpers for the data tests: a local HTTP server with Range support, tiny real-layout trees.

The archives are built in the real datasets' layouts (MVTec tar.xz, VisA tar + split csv,
Real-IAD per-object zips + json, DTD tar.gz), only with a few small images, so the real
download/verify/extract/check/cache code runs end to end without the internet.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from omniad.data.params import load_params, override


@pytest.fixture(autouse=True)
def isolated_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Checksum locks of a test go to its tmp dir, never into the repo's params/checksums
    (autouse in every module that imports it)."""
    monkeypatch.setenv("OMNIAD_CHECKSUMS", str(tmp_path / "checksums"))
    monkeypatch.delenv("OMNIAD_DATA_MIRROR", raising=False)
    return tmp_path / "checksums"


# --------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    """What the server serves and how it misbehaves; `requests` logs every request seen."""

    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    drop_after: list[int] = field(default_factory=list)  # per request: bytes sent, then close
    token: str | None = None  # when set, require "Authorization: Bearer <token>"
    requests: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self.server.state
        auth = self.headers.get("Authorization")
        rng = self.headers.get("Range")
        state.requests.append({"path": self.path, "range": rng, "auth": auth})
        if state.token is not None and auth != f"Bearer {state.token}":
            self.send_error(401, "token required")
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, end, status = 0, len(data) - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if match and state.honour_range:
            start = int(match.group(1))
            end = min(int(match.group(2)), end) if match.group(2) else end
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        cut = state.drop_after.pop(0) if state.drop_after else None
        if cut is not None:  # send part of the body, then drop the connection
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


@contextmanager
def serve(state: ServerState, max_seconds: float = 60.0) -> Iterator[str]:
    """Serve state.files on 127.0.0.1 in a thread; yields the base URL; stops by itself."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = state
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    watchdog = threading.Timer(max_seconds, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------------------------
# images and archives
# --------------------------------------------------------------------------------------------


def image_bytes(rng: np.random.Generator, w: int = 40, h: int = 32, fmt: str = "PNG") -> bytes:
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def mask_bytes(w: int = 40, h: int = 32, value: int = 255) -> bytes:
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = value
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tar_bytes(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in sorted(files.items()):
            zf.writestr(rel, data)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_lock_file(path: Path) -> dict[str, str]:
    """archive name -> hash of a `sha256sum`-format lock, parsed independently of omniad."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            sha, name = line.split("  ", 1)
            out[name] = sha
    return out


# --------------------------------------------------------------------------------------------
# datasets in their real layouts
# --------------------------------------------------------------------------------------------

MVTEC_CATS = ["bottle", "cable"]
MVTEC_COUNTS = {"train_normal": 3, "train_anomaly": 0, "test_normal": 2, "test_anomaly": 3}


def mvtec_files(seed: int = 0) -> dict[str, bytes]:
    """Two categories; test defects 'broken' (2) and 'crack' (1), masks named <stem>_mask.png."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {"license.txt": b"CC BY-NC-SA 4.0\n",
                               # incompressible, so the archive spans several download chunks
                               "readme.bin": rng.bytes(300_000)}
    for cat in MVTEC_CATS:
        for i in range(3):
            files[f"{cat}/train/good/{i:03d}.png"] = image_bytes(rng)
        for i in range(2):
            files[f"{cat}/test/good/{i:03d}.png"] = image_bytes(rng)
        for defect, n in (("broken", 2), ("crack", 1)):
            for i in range(n):
                files[f"{cat}/test/{defect}/{i:03d}.png"] = image_bytes(rng)
                files[f"{cat}/ground_truth/{defect}/{i:03d}_mask.png"] = mask_bytes()
    return files


def mvtec_params(url: str | None = None, sha: str | None = None) -> dict[str, Any]:
    per_cat = {c: dict(MVTEC_COUNTS) for c in MVTEC_CATS}
    totals = {k: v * len(MVTEC_CATS) for k, v in MVTEC_COUNTS.items()}
    return override(
        load_params(), "mvtec_ad", categories=MVTEC_CATS,
        archives=[{"name": "mvtec_anomaly_detection.tar.xz", "url": url, "sha256": sha,
                   "extract_to": ""}],
        expected={"totals": totals, "per_category": per_cat},
    )


VISA_CATS = ["candle", "pcb1"]


def visa_files(seed: int = 0) -> dict[str, bytes]:
    """VisA layout: <obj>/Data/Images/{Normal,Anomaly}/*.JPG, masks in Data/Masks/Anomaly."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    rows = [["object", "split", "label", "image", "mask"]]
    for obj in VISA_CATS:
        for i in range(4):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            files[rel] = image_bytes(rng, fmt="JPEG")
            rows.append([obj, "train" if i < 3 else "test", "normal", rel, ""])
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            files[rel] = image_bytes(rng, fmt="JPEG")
            files[mrel] = mask_bytes(value=1)  # VisA: non-zero = anomalous
            rows.append([obj, "test", "anomaly", rel, mrel])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    files["split_csv/1cls.csv"] = buf.getvalue().encode()
    return files


def visa_params(url: str | None = None, sha: str | None = None) -> dict[str, Any]:
    return override(
        load_params(), "visa", categories=VISA_CATS,
        archives=[{"name": "VisA_20220922.tar", "url": url, "sha256": sha, "extract_to": ""}],
        expected={"totals": {"train_normal": 6, "train_anomaly": 0, "test_normal": 2,
                             "test_anomaly": 4},
                  "per_category": {c: {"train_normal": 3, "test_normal": 1, "test_anomaly": 2}
                                   for c in VISA_CATS}},
    )


REALIAD_CATS = ["audiojack", "pcb"]


REALIAD_SIZES = {"realiad_256": 24, "realiad_512": 48, "realiad_1024": 96}


def realiad_archives(seed: int = 0, variant: str = "realiad_256",
                     size: int | None = None) -> dict[str, bytes]:
    """Hub layout: realiad_jsons.zip + <variant>/<obj>.zip; 5 views per sample; images of
    the variant's (scaled-down) resolution unless `size` says otherwise."""
    side = size or REALIAD_SIZES[variant]
    rng = np.random.default_rng(seed)
    archives: dict[str, bytes] = {}
    jsons: dict[str, bytes] = {}
    for obj in REALIAD_CATS:
        files: dict[str, bytes] = {}
        doc: dict[str, Any] = {"meta": {"prefix": obj, "normal_class": "OK"},
                               "train": [], "test": []}
        plan = [("train", "OK", 1), ("train", "OK", 2), ("test", "OK", 3), ("test", "AK", 4)]
        for split, cls, sid in plan:
            for view in range(1, 6):
                stem = f"{obj}_{sid:04d}_{cls}_C{view}_20231021130205"
                sub = "OK" if cls == "OK" else f"NG/{cls}"
                img_rel = f"{sub}/S{sid:04d}/{stem}.jpg"
                files[f"{obj}/{img_rel}"] = image_bytes(rng, side, side, fmt="JPEG")
                mask_rel = None
                if cls != "OK":
                    mask_rel = f"{sub}/S{sid:04d}/{stem}.png"
                    files[f"{obj}/{mask_rel}"] = mask_bytes(side, side)
                doc[split].append({"category": obj, "anomaly_class": cls,
                                   "image_path": img_rel, "mask_path": mask_rel})
        archives[f"{variant}/{obj}.zip"] = zip_bytes(files)
        jsons[f"realiad_jsons/{obj}.json"] = json.dumps(doc).encode()
    archives["realiad_jsons.zip"] = zip_bytes(jsons)
    return archives


def realiad_params(base_url: str | None = None) -> dict[str, Any]:
    return override(
        load_params(), "real_iad", categories=REALIAD_CATS, base_url=base_url,
        auth_hosts=["127.0.0.1"], resolutions=dict(REALIAD_SIZES),
        expected={"totals": {"train_normal": 20, "train_anomaly": 0, "test_normal": 10,
                             "test_anomaly": 10}},
    )


DTD_CATS = ["banded", "zigzagged"]


def dtd_files(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"dtd/images/{t}/{t}_{i:04d}.jpg": image_bytes(rng, fmt="JPEG")
            for t in DTD_CATS for i in range(3)} | {"dtd/README.txt": b"DTD\n"}


def dtd_params(url: str | None = None) -> dict[str, Any]:
    return override(
        load_params(), "dtd", categories=DTD_CATS,
        archives=[{"name": "dtd-r1.0.1.tar.gz", "url": url, "sha256": None, "extract_to": ""}],
        expected={"totals": {"train_normal": 6}, "each_category": {"train_normal": 3}},
    )


def leftovers(parent: Path) -> list[str]:
    """Hidden temp trees left beside dataset roots (must be none after a failed run)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and "-" in p.name)
