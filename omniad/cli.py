"""``omniad`` command line: one door to every step, so Snakemake, DVC and a person run the same."""

from __future__ import annotations

import argparse
import os
import sys

PROTOCOL_HELP = "protocol of params/protocols.yaml (default: its 'default', e.g. demo)"


def _complexity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("complexity", help="params and FLOPs of every variant vs the paper")
    p.add_argument("--method", default=None, help="one method's default (e.g. rd4ad)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-flops", action="store_true", help="parameters only (fast)")
    p.add_argument("--cache", action="store_true",
                   help="fill the report's cache (results/complexity.json) unless it is current")
    p.set_defaults(func=lambda a: __import__("omniad.complexity", fromlist=["main"]).main(a))


def _run_cmds(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (("train", "train one run (resumes from its checkpoint)"),
                           ("evaluate", "evaluate one trained run, write metrics.json")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="run key protocol/dataset/method/variant/seed "
                                   "(see `omniad grid runs`)")
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
        p.add_argument("--bf16", action="store_true", help="bf16 autocast (as the protocol's bf16: true)")
        p.add_argument("--channels-last", action="store_true", help="channels_last (as the protocol's)")
        if name == "train":
            p.add_argument("--evaluate", action="store_true",
                           help="then evaluate the final model in the same process, as "
                                "`omniad evaluate` does (the DAG's one job per run)")
        if name == "evaluate":
            p.add_argument("--no-track", action="store_true",
                           help="do not log to MLflow now, whatever the protocol's `tracking` "
                                "(`omniad track sync` logs it later)")
        p.set_defaults(func=lambda a, n=name: getattr(
            __import__("omniad.engine.runner", fromlist=["x"]), f"cli_{n}")(a))


def _features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="compute a run's frozen-encoder feature cache once")
    p.add_argument("run", help="run key; every run with the same feature key shares it")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    p.set_defaults(func=lambda a: __import__("omniad.engine.runner", fromlist=["x"]).cli_features(a))


def _grid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="the experiment grid of params/")
    p.add_argument("what", choices=["runs", "count", "check", "cost"],
                   help="runs: one run key a line; count: how many; check: validate params/ "
                        "(every file, model block and override); cost: device time of the grid")
    p.add_argument("--protocol", default=None, help=PROTOCOL_HELP)
    p.add_argument("--throughput", default=None, help="cost: benchmarks/train_throughput.py "
                   "--json output (default results/throughput.json when present)")
    p.add_argument("--images-per-s", type=float, default=None,
                   help="cost: your measured train images/s for runs with no other measure")
    p.add_argument("--summary", action="store_true", help="cost: the total line only")

    def run(a: argparse.Namespace) -> int:
        from omniad.grid import enumerate_runs, load_params

        if a.what == "cost":
            from omniad.gridcost import cli as cost

            return cost(a)

        params = load_params()
        runs = enumerate_runs(params, a.protocol or params.default_protocol)
        if a.what == "runs":
            print("\n".join(r.key for r in runs))
        elif a.what == "count":
            print(len(runs))
        else:
            print(f"params/ valid: {len(params.protocols)} protocols, {len(params.methods)} "
                  f"methods, {len(params.grid.tables)} tables")
        return 0

    p.set_defaults(func=run)


def _track(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="MLflow: create the store, sync results written offline")
    p.add_argument("what", choices=["init", "sync"],
                   help="init: create the MLflow store; sync: log finished runs not yet there")
    p.add_argument("--protocol", default=None, help=PROTOCOL_HELP)
    p.set_defaults(func=lambda a: __import__("omniad.tracking", fromlist=["x"]).cli(a))


def _report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="aggregate results, write LaTeX tables, figures, PDF")
    p.add_argument("--protocol", default=None, help=PROTOCOL_HELP)
    p.add_argument("--no-pdf", action="store_true", help="tables and figures only, no LaTeX run")
    p.add_argument("--selection", choices=["final", "released-max"], default="final",
                   help="what the tables show: the final model (default) or the released "
                        "trainers' per-metric maximum over the evaluations")
    p.add_argument("--dvc-summary", action="store_true",
                   help="only copy the protocol's summary.json and plots to summary/ (what "
                        "dvc.yaml's metrics and plots read); the report must exist")
    p.set_defaults(func=lambda a: __import__("omniad.report.dvc_summary", fromlist=["x"]).cli(
        a.protocol) if a.dvc_summary else __import__("omniad.report", fromlist=["x"]).cli(a))


def _weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="fetch / check pretrained encoder weights (local cache)")
    p.add_argument("what", choices=["fetch", "check"],
                   help="fetch: download and verify into the local cache; check: verify only")
    p.add_argument("tags", nargs="*", help="timm tags, e.g. resnet34.bt_in1k (default: all used)")
    p.set_defaults(func=lambda a: __import__("omniad.weights", fromlist=["x"]).cli(a))


def _where(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("where", help="what a protocol has produced and where; what is missing")
    p.add_argument("--protocol", default=None, help=PROTOCOL_HELP)
    p.set_defaults(func=lambda a: __import__("omniad.where", fromlist=["x"]).main(a.protocol))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _complexity(sub)
    from omniad.data.cli import add_parser as add_data

    add_data(sub)
    _run_cmds(sub)
    _features(sub)
    _grid(sub)
    _track(sub)
    _report(sub)
    _weights(sub)
    _where(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad params print their one-line message (no traceback), exit 2; a
    closed stdout (``| head``) ends quietly with 0."""
    from omniad.grid import ParamsError

    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader left (e.g. `| head -1`): as the Python docs advise, point stdout at
        # devnull so the interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
