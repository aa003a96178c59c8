"""Install the project into a venv with uv when it can, pip otherwise (``make venv``).

Why: pip spends ~100 s on a fresh venv (torch's 5.5 GB wheel unpacked single-threaded, then
~150 packages resolved one by one); uv installs the same pins in ~20 s, the largest share of
`make demo`'s wall time that is not training. uv does not read pip's configuration, so the
indexes, find-links, constraints and certificate pip is configured with (``pip config list``:
files and PIP_* variables) are passed on, and uv is told to weigh every index as pip does.
If uv cannot be installed or fails, pip installs instead, with its own configuration.

    python workflow/install_venv.py .venv EXTRAS CONSTRAINTS REQUIREMENT...
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: pip option -> uv option (options absent here are not passed on; uv's defaults apply).
PIP_TO_UV = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
             "find-links": "--find-links", "constraint": "--constraint"}


def pip_config(pip: Path) -> dict[str, list[str]]:
    """pip's effective options (config files, then PIP_* variables), values split as pip does."""
    out = subprocess.run([str(pip), "config", "list"], capture_output=True, text=True).stdout
    options: dict[str, list[str]] = {}
    env: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep or "." not in key:
            continue
        scope, _, name = key.rpartition(".")
        values = shlex.split(value.strip().strip("'\""))
        (env if scope == ":env:" else options)[name] = values
    return {**options, **env}


def uv_args(config: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    args: list[str] = []
    for name, flag in PIP_TO_UV.items():
        for value in config.get(name, []):
            args += [flag, value]
    env = dict(os.environ)
    if config.get("cert"):
        env.setdefault("SSL_CERT_FILE", config["cert"][0])
    if config.get("no-index", ["false"])[0].lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    # pip picks the best version over all indexes; uv's default stops at the first that has
    # the package
    args += ["--index-strategy", "unsafe-best-match"]
    return args, env


def run(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, env=env).returncode == 0


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    venv, extras, constraints, *reqs = argv
    bin_ = Path(venv) / "bin"
    pip, python, uv = bin_ / "pip", bin_ / "python", bin_ / "uv"
    editable = ["-e", f".[{extras}]"] if extras else ["-e", "."]
    start = time.monotonic()
    if os.environ.get("OMNIAD_INSTALLER", "uv") == "uv" and run([str(pip), "install", "-q", "uv"]):
        args, env = uv_args(pip_config(pip))
        cmd = [str(uv), "pip", "install", "-q", "--compile-bytecode", "--python", str(python), *args,
               "-c", constraints, *reqs, *editable]
        if run(cmd, env):
            print(f"[venv] installed with uv in {time.monotonic() - start:.0f} s")
            return 0
        print("[venv] uv failed; installing with pip", file=sys.stderr)
    ok = (run([str(pip), "install", "-q", "-c", constraints, *reqs])
          and run([str(pip), "install", "-q", "-c", constraints, *editable]))
    if ok:
        print(f"[venv] installed with pip in {time.monotonic() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
