"""`omniad data fetch|check|cache|demo`: argparse sub-commands of the data layer.

`add_parser(subparsers)` registers the `data` command on the main CLI; every leaf sets
`func`, a callable (argparse.Namespace) -> int exit code. `python -m omniad.data.cli ...`
runs the same sub-commands without the `data` word.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omniad.data.samples import DatasetError

FETCHABLE = ("mvtec_ad", "visa", "real_iad", "dtd")
CHECKABLE = (*FETCHABLE, "demo")


def _params(args: argparse.Namespace):  # -> Params
    from omniad.data.params import load_params

    return load_params(args.params)


def _reader_opts(args: argparse.Namespace) -> dict:
    opts = {}
    if getattr(args, "variant", None):
        opts["variant"] = args.variant
    if getattr(args, "views", None):
        opts["views"] = args.views
    return opts


def _cmd_fetch(args: argparse.Namespace) -> int:
    from omniad.data.fetch import fetch_dataset

    manifest = fetch_dataset(
        args.dataset, args.root, _params(args), url=args.url, source=args.source,
        trust_first_download=args.trust_first_download, downloads=args.downloads,
        variants=args.variant or None, in_place=args.in_place, progress=not args.quiet,
    )
    print(f"{args.dataset}: ready at {Path(args.root).absolute()} "
          f"({len(manifest['files'])} files, tree sha256 {manifest['tree_sha256']})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from omniad.data.check import check_dataset

    report = check_dataset(args.dataset, args.root, categories=args.categories,
                           params=_params(args), workers=args.workers,
                           progress=not args.quiet, **_reader_opts(args))
    print(report.table())
    for msg in report.warnings[:50]:
        print(f"WARNING {msg}")
    for msg in report.problems[:200]:
        print(f"ERROR {msg}")
    if len(report.problems) > 200:
        print(f"ERROR ... and {len(report.problems) - 200} more problems")
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_cache(args: argparse.Namespace) -> int:
    from omniad.data.cache import build_cache

    out = build_cache(args.dataset, args.root, args.size, args.out, categories=args.categories,
                      params=_params(args), workers=args.workers, force=args.force,
                      progress=not args.quiet, **_reader_opts(args))
    print(f"{args.dataset}: cache ready at {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from omniad.data.demo import make_demo

    root = make_demo(args.root, seed=args.seed, size=args.size, params=_params(args))
    print(f"demo: generated at {root} (seed {args.seed}, {args.size}x{args.size}); "
          f"next: omniad data check demo --root {args.root}")
    return 0


def os_error_line(exc: OSError) -> str:
    """'<path>: <fault>' for an OS error (both paths of a failed rename), never a traceback."""
    fault = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {fault}" if paths else f"{type(exc).__name__}: {fault}"


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad dataset input or an OS fault (permissions, read-only or full disk) becomes one
    error line and exit code 2, not a traceback."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(cmd(args))
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader left (`| head`): omniad.cli.main ends quietly
            raise
        except OSError as exc:
            print(f"error: {os_error_line(exc)}", file=sys.stderr)
            return 2

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=None,
                   help="dataset facts YAML (default: params/datasets.yaml)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{fetch,check,cache,demo}",
                                required=True)

    p = sub.add_parser("fetch", help="download (or take --source), verify, extract, record")
    p.add_argument("dataset", choices=FETCHABLE, help="which dataset to fetch")
    p.add_argument("--root", type=Path, required=True, help="the dataset's own directory")
    p.add_argument("--url", help="archive URL (one-archive datasets) or base URL")
    p.add_argument("--source", type=Path,
                   help="local copy: archive file, directory of archives, or extracted tree")
    p.add_argument("--trust-first-download", action="store_true",
                   help="accept an archive whose SHA-256 is unknown and record the hash seen")
    p.add_argument("--downloads", type=Path, help="archive directory (default: ROOT/../downloads)")
    p.add_argument("--variant", action="append",
                   help="Real-IAD resolution variant(s) to fetch (default realiad_256); "
                        "variants already in ROOT are kept")
    p.add_argument("--in-place", action="store_true",
                   help="with --source TREE: use the tree where it is (ROOT gets links and the "
                        "manifest only; TREE may be read-only)")
    _common(p)
    p.set_defaults(func=_guarded(_cmd_fetch))

    p = sub.add_parser("check", help="validate layout, pairing, decoding and counts")
    p.add_argument("dataset", choices=CHECKABLE, help="which dataset to check")
    p.add_argument("--root", type=Path, required=True, help="the dataset's own directory")
    p.add_argument("--categories", nargs="+", help="check only these (no total counts)")
    p.add_argument("--variant", help="Real-IAD resolution variant (default realiad_256)")
    p.add_argument("--views", nargs="+", help="Real-IAD camera views, e.g. C1 C3")
    p.add_argument("--workers", type=int, help="decoding threads (default: usable CPUs)")
    _common(p)
    p.set_defaults(func=_guarded(_cmd_check))

    p = sub.add_parser("cache", help="resize everything once into memory-mappable arrays")
    p.add_argument("dataset", choices=CHECKABLE, help="which dataset to cache")
    p.add_argument("--root", type=Path, required=True, help="the dataset's own directory")
    p.add_argument("--size", type=int, default=256, help="square side in pixels (default 256)")
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument("--categories", nargs="+", help="cache only these categories (default: all)")
    p.add_argument("--variant", help="Real-IAD resolution variant (default realiad_256)")
    p.add_argument("--views", nargs="+", help="Real-IAD camera views, e.g. C1 C3")
    p.add_argument("--workers", type=int, help="decoding threads (default: usable CPUs)")
    p.add_argument("--force", action="store_true", help="rebuild even if the key matches")
    _common(p)
    p.set_defaults(func=_guarded(_cmd_cache))

    p = sub.add_parser("demo", help="generate the embedded demo set (MVTec layout)")
    p.add_argument("--root", type=Path, required=True, help="where to write the demo set")
    p.add_argument("--seed", type=int, default=0, help="random seed of the images (default 0)")
    p.add_argument("--size", type=int, default=128, help="square side in pixels (default 128)")
    _common(p)
    p.set_defaults(func=_guarded(_cmd_demo))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data` with its sub-commands on the main CLI's subparsers."""
    parser = subparsers.add_parser("data", help="datasets: fetch, check, cache, demo",
                                   description=__doc__.splitlines()[0])
    _add_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniad.data.cli",
                                     description=__doc__.splitlines()[0])
    _add_subcommands(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
