"""workflow/install_venv.py: pip's configuration reaches uv (indexes, find-links, constraints,
certificate), so `make venv` installs from the same places with either installer."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import REPO

spec = importlib.util.spec_from_file_location("install_venv", REPO / "workflow" / "install_venv.py")
install_venv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_venv)


def fake_pip(tmp_path: Path, listing: str) -> Path:
    pip = tmp_path / "pip"
    pip.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}\nEOF\n")
    pip.chmod(0o755)
    return pip


def test_pip_config_files_then_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    pip = fake_pip(tmp_path, "\n".join([
        "global.cert='/etc/ssl/certs/ca.crt'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.find-links='/opt/wheels'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        ":env:.find-links='/srv/wheels'",
        ":env:.index-url='https://mirror.example/simple'",
    ]))
    config = install_venv.pip_config(pip)
    assert config["extra-index-url"] == ["file:///opt/a/simple", "file:///opt/b/simple"]
    assert config["find-links"] == ["/srv/wheels"]  # PIP_FIND_LINKS wins over the file
    args, env = install_venv.uv_args(config)
    assert args == ["--index-url", "https://mirror.example/simple",
                    "--extra-index-url", "file:///opt/a/simple",
                    "--extra-index-url", "file:///opt/b/simple",
                    "--find-links", "/srv/wheels",
                    "--constraint", "/etc/xdg/pip/constraints.txt",
                    "--index-strategy", "unsafe-best-match"]
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca.crt"


def test_no_pip_configuration_passes_nothing_but_the_strategy(tmp_path: Path) -> None:
    args, _ = install_venv.uv_args(install_venv.pip_config(fake_pip(tmp_path, "")))
    assert args == ["--index-strategy", "unsafe-best-match"]


def test_no_index_is_passed_only_when_set_true(tmp_path: Path) -> None:
    for value, want in (("true", True), ("1", True), ("false", False), ("0", False)):
        args, _ = install_venv.uv_args({"no-index": [value]})
        assert ("--no-index" in args) is want, value


def test_usage_error_without_arguments() -> None:
    out = subprocess.run([sys.executable, str(REPO / "workflow" / "install_venv.py")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "install_venv.py .venv EXTRAS" in out.stderr
