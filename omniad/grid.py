"""The experiment grid, read from ``params/`` (the single source of truth) and validated.

Snakemake, DVC, the engine and the report all call this module; none of them spells an
experiment or a path by hand. A run is (protocol, dataset, method, variant, seed); a variant is
a set of model overrides, named canonically so equal overrides are one run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from omniad.codehash import evaluate_code, train_code
from omniad.optim_config import OptimConfig
from omniad.params_errors import explain, nearest, shown, unknown_key
from omniad.run_config import RunConfig

REPO = Path(__file__).resolve().parent.parent


def params_dir() -> Path:
    """params/ of this checkout, or $OMNIAD_PARAMS (tests and forks point it elsewhere)."""
    return Path(os.environ.get("OMNIAD_PARAMS", REPO / "params"))


class ParamsError(ValueError):
    """A params file is malformed; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    gpu: int = 0
    cpus: int = 1
    mem_mb: int = 2000
    runtime: int = 30  # minutes


class MethodSchedule(_Strict):
    """A protocol's schedule for one method, where it differs from the protocol's own."""

    epochs: dict[str, int] = {}  # dataset -> epochs
    batch_size: int | None = Field(None, gt=0)
    evaluate_every: int | None = Field(None, ge=0)
    source: str = ""  # where the numbers come from


class Seeds(_Strict):
    """Seeds per table kind: Table I (``methods``) and the ablation tables (``ablation``).

    A run that two tables share (Omni-AD's default) is trained once per seed of either; keep
    Table I's seeds a subset of the ablation seeds so that run is reused, not added.
    """

    methods: list[int] = Field([42], min_length=1)
    ablation: list[int] = Field([42], min_length=1)


class Protocol(_Strict):
    datasets: list[str]
    ablation_dataset: str
    image_size: int = Field(gt=0)
    epochs: dict[str, int]
    batch_size: int | None = None  # None: each method's own
    # {methods: [...], ablation: [...]}; a plain list means the same seeds for every table
    seeds: Seeds = Seeds()
    pretrained: bool = True
    # Random encoders only (pretrained: false): "train" estimates their BatchNorm statistics
    # from the training images before training (calibrate_random_backbones); "init" keeps
    # the init statistics, under which a random encoder's deep stages fade out.
    random_encoder_bn: Literal["train", "init"] = "train"
    checkpoint_every: int = Field(1, ge=1)
    # Frozen-encoder features computed once per encoder state (omniad/engine/features.py) and
    # stored at this precision; "off" recomputes them every step as the released code does.
    # float32 trains bit-identically to the images path; float16 halves the disk and rounds
    # the targets (its effect on the loss: README, benchmarks).
    feature_cache: Literal["off", "float32", "float16"] = "off"
    # GPU options (off = the released fp32 loop): bf16 autocast, channels_last tensors,
    # torch.compile of the trained modules (compile_backend: inductor, or aot_eager/eager where
    # no compiler is available).
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    # Periodic evaluation every N epochs (0: only the final model). The final evaluation
    # counts as one: the released-style maximum is taken over these and the final one.
    evaluate_every: int = Field(0, ge=0)
    # MLflow: "each_run" logs a run when its evaluation ends (live in `mlflow ui` during a
    # cluster grid); "at_end" logs them all in one `omniad track sync` job after the last
    # evaluation (a laptop's demo: one MLflow import instead of one per run).
    tracking: Literal["each_run", "at_end"] = "each_run"
    methods: dict[str, MethodSchedule] = {}  # per-method epochs / batch size (e.g. ADer's)
    eval_batch_size: int = 16
    workers: int | Literal["auto"] = "auto"
    exclude_rows: dict[str, list[str]] = {}
    resources: dict[str, Resources] = {}

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, v: Any) -> Any:
        return {"methods": v, "ablation": v} if isinstance(v, list) else v

    def seeds_for(self, kind: str) -> list[int]:
        """Seeds of a table kind ('methods' or 'ablation')."""
        return self.seeds.methods if kind == "methods" else self.seeds.ablation

    @property
    def all_seeds(self) -> list[int]:
        """Every seed the protocol trains, in order of first appearance."""
        return list(dict.fromkeys([*self.seeds.methods, *self.seeds.ablation]))

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        missing = [d for d in self.datasets if d not in self.epochs]
        if missing:
            raise ValueError(f"epochs has no entry for datasets {missing}")
        if self.ablation_dataset not in self.datasets:
            raise ValueError(f"ablation_dataset {self.ablation_dataset!r} not in datasets")
        for m, sched in self.methods.items():
            unknown = [d for d in sched.epochs if d not in self.datasets]
            if unknown:
                raise ValueError(f"methods.{m}.epochs names datasets {unknown} not in datasets")
        return self

    def schedule(self, method: str, dataset: str) -> tuple[int, int | None, int]:
        """(epochs, batch size or None for the method's own, evaluate_every) of one run."""
        own = self.methods.get(method, MethodSchedule())
        every = own.evaluate_every if own.evaluate_every is not None else self.evaluate_every
        return (own.epochs.get(dataset, self.epochs[dataset]),
                own.batch_size or self.batch_size, every)


class Method(_Strict):
    label: str
    venue: str = "-"
    status: Literal["implemented", "cited", "planned"]
    builder: str | None = None
    model: dict[str, Any] = {}
    batch_size: int = Field(16, gt=0)
    optim: OptimConfig | None = None  # required when implemented
    sources: dict[str, str] = {}
    # {topic: which reference this method follows for it, and what the others do}; listed
    # in the report's audit (learning-rate schedule, clipping, weight decay, stepping, ...)
    follows: dict[str, str] = {}
    protocol_overrides: dict[str, dict[str, Any]] = {}  # protocol -> model overrides

    @model_validator(mode="after")
    def _builder_when_implemented(self) -> Method:
        if self.status == "implemented" and not self.builder:
            raise ValueError("an implemented method needs a builder 'module:callable'")
        if self.status == "implemented" and self.optim is None:
            raise ValueError("an implemented method needs an optim block")
        return self


class Table(_Strict):
    title: str
    kind: Literal["methods", "ablation"]
    axis: str | None = None
    rows: dict[str, dict[str, Any]] = {}
    methods: list[str] = []  # row order of a methods table (the paper's)
    # "paper": one of the paper's tables (its numbers in params/paper.yaml); "ours": a table
    # this project adds (no paper numbers, no claims to check)
    source: Literal["paper", "ours"] = "paper"


class Grid(_Strict):
    #: The method whose variants the ablation tables (kind: ablation) train
    ablation_method: str
    table_order: list[str]
    tables: dict[str, Table]


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: file missing") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def _validate(model: type[BaseModel], data: Any, where: Path, prefix: str = "") -> Any:
    """``model`` from ``data``, or a one-line ParamsError: file, key path, nearest valid key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(explain(exc, where, model, prefix)) from None


def _unknown(where: Path, path: str, what: str, name: str, known: Iterable[str]) -> ParamsError:
    """``file: key.path: unknown <what> 'x' (did you mean 'y'?)`` for a name params refer to."""
    return ParamsError(f"{shown(where)}: {path}: unknown {what} {name!r}"
                       f"{nearest(str(name), [str(k) for k in known])}")


class Params:
    """All of ``params/``, validated."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        proto_file = self.root / "protocols.yaml"
        proto_raw = _read_yaml(proto_file)
        if (bad := unknown_key(proto_raw, ["default", "protocols"], proto_file)) is not None:
            raise ParamsError(bad)
        self.default_protocol: str = proto_raw.get("default", "demo")
        self.protocols: dict[str, Protocol] = {}
        raw = proto_raw.get("protocols") or {}
        for name, body in raw.items():
            merged = dict(body)
            parent = merged.pop("inherit", None)
            if parent is not None:
                if parent not in raw:
                    raise _unknown(proto_file, f"protocols.{name}.inherit", "protocol", parent, raw)
                merged = {**raw[parent], **merged}
            self.protocols[name] = _validate(Protocol, merged, proto_file, f"protocols.{name}")
        files = sorted((self.root / "methods").glob("*.yaml"))
        if not files:
            raise ParamsError(f"{self.root / 'methods'}: no method files (one YAML per method)")
        self.methods: dict[str, Method] = {
            f.stem: _validate(Method, _read_yaml(f), f) for f in files
        }
        self.grid: Grid = _validate(Grid, _read_yaml(self.root / "grid.yaml"), self.root / "grid.yaml")
        order = [m for t in self.grid.tables.values() for m in t.methods]
        self.methods = dict(sorted(self.methods.items(), key=lambda kv: (
            order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
        self.paper: dict = _read_yaml(self.root / "paper.yaml")
        self.datasets: dict = _read_yaml(self.root / "datasets.yaml").get("datasets", {})
        self._check_refs()
        self._check_model_blocks()

    def _check_model_blocks(self) -> None:
        """Each method's ``model`` block, alone and with each protocol override, and each
        ablation row, against the method's config class (``config_class`` of its builder)."""
        for name, spec in self.methods.items():
            cfg_cls = getattr(_import(spec.builder), "config_class", None) if spec.builder else None
            if cfg_cls is None:
                continue
            where = self.root / "methods" / f"{name}.yaml"
            _validate(cfg_cls, spec.model, where, "model")
            for proto, over in spec.protocol_overrides.items():
                if proto not in self.protocols:
                    raise _unknown(where, "protocol_overrides", "protocol", proto, self.protocols)
                _validate(cfg_cls, {**spec.model, **over}, where, f"protocol_overrides.{proto}")
        ablation = self.methods.get(self.grid.ablation_method)  # rows are its overrides
        if ablation is None or not ablation.builder:
            return
        row_cls = getattr(_import(ablation.builder), "config_class", None)
        for tname, table in self.grid.tables.items():
            for row, over in table.rows.items() if row_cls else ():
                _validate(row_cls, {**ablation.model, **over}, self.root / "grid.yaml",
                          f"tables.{tname}.rows.{row}")

    def _check_refs(self) -> None:
        pfile, gfile = self.root / "protocols.yaml", self.root / "grid.yaml"
        if self.default_protocol not in self.protocols:
            raise _unknown(pfile, "default", "protocol", self.default_protocol, self.protocols)
        for pname, proto in self.protocols.items():
            at = f"protocols.{pname}"
            for ds in proto.datasets:
                if ds not in self.datasets:
                    raise _unknown(pfile, f"{at}.datasets", "dataset", ds, self.datasets)
            for m in proto.methods:
                if m not in self.methods:
                    raise _unknown(pfile, f"{at}.methods", "method", m, self.methods)
            for table, rows in proto.exclude_rows.items():
                known = self.grid.tables.get(table)
                if known is None:
                    raise _unknown(pfile, f"{at}.exclude_rows", "table", table, self.grid.tables)
                for r in rows:
                    if r not in known.rows:
                        raise _unknown(pfile, f"{at}.exclude_rows.{table}", "row", r, known.rows)
        ablation = self.grid.ablation_method
        if ablation not in self.methods:
            raise _unknown(gfile, "ablation_method", "method", ablation, self.methods)
        if self.methods[ablation].status != "implemented":
            raise ParamsError(f"{shown(gfile)}: ablation_method: {ablation!r} is "
                              f"{self.methods[ablation].status}, not implemented (implemented: "
                              f"{', '.join(self.implemented())})")
        for t in self.grid.table_order:
            if t not in self.grid.tables:
                raise _unknown(gfile, "table_order", "table", t, self.grid.tables)

    def protocol(self, name: str | None = None) -> Protocol:
        name = name or self.default_protocol
        if name not in self.protocols:
            raise ParamsError(f"unknown protocol {name!r}{nearest(name, list(self.protocols))}; "
                              f"known: {sorted(self.protocols)}")
        return self.protocols[name]

    def implemented(self) -> list[str]:
        return [m for m, spec in self.methods.items() if spec.status == "implemented"]


def load_params(root: str | Path | None = None) -> Params:
    """Validated params (cached per folder)."""
    return _load(str(Path(root) if root else params_dir()))


@cache
def _load(root: str) -> Params:
    return Params(Path(root))


load_params.cache_clear = _load.cache_clear  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Variants and runs.
# --------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "-".join(_fmt(x) for x in v)
    return str(v).lower()


def variant_id(overrides: dict[str, Any]) -> str:
    """Canonical name of a set of model overrides ('default' for none)."""
    keys = sorted(k for k in overrides if k != "pretrained")
    if not keys:
        return "default"
    return "_".join(f"{k}-{_fmt(overrides[k])}" for k in keys)


class Run(BaseModel):
    """One training + evaluation job."""

    model_config = ConfigDict(frozen=True)

    protocol: str
    dataset: str
    method: str
    variant: str
    seed: int
    overrides: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return run_key(self.protocol, self.dataset, self.method, self.variant, self.seed)

    def dir(self, results: Path | None = None) -> Path:
        return run_dir(self.protocol, self.dataset, self.method, self.variant, self.seed, results)


def run_key(protocol: str, dataset: str, method: str, variant: str, seed: int | str) -> str:
    """The one place run keys are made: 'protocol/dataset/method/variant/seed' (the CLI's
    argument, the workflow's job key; :func:`parse_run_key` reads it back)."""
    return f"{protocol}/{dataset}/{method}/{variant}/{seed}"


def results_root() -> Path:
    return Path(os.environ.get("OMNIAD_RESULTS", REPO / "results"))


def run_dir(protocol: str, dataset: str, method: str, variant: str, seed: int | str,
            results: Path | None = None) -> Path:
    """The one place run paths are made: results/<protocol>/runs/<dataset>/<method>/<variant>/<seed>."""
    return (results or results_root()) / protocol / "runs" / dataset / method / variant / f"seed{seed}"


def table_rows(params: Params, protocol: str, table: str) -> dict[str, dict[str, Any]]:
    """Rows of an ablation table that this protocol runs (exclusions removed)."""
    spec = params.grid.tables[table]
    skip = set(params.protocol(protocol).exclude_rows.get(table, []))
    return {r: o for r, o in spec.rows.items() if r not in skip}


def enumerate_runs(params: Params, protocol: str) -> list[Run]:
    """Every run of a protocol, deduplicated (shared variants trained once)."""
    proto = params.protocol(protocol)
    runs: dict[str, Run] = {}

    def add(dataset: str, method: str, overrides: dict[str, Any], kind: str) -> None:
        for seed in proto.seeds_for(kind):
            run = Run(protocol=protocol, dataset=dataset, method=method,
                      variant=variant_id(_strip_defaults(params, method, overrides)), seed=seed,
                      overrides=_strip_defaults(params, method, overrides))
            runs.setdefault(run.key, run)

    for tname in params.grid.table_order:
        table = params.grid.tables[tname]
        if table.kind == "methods":
            for ds in proto.datasets:
                for m in params.implemented():
                    add(ds, m, {}, table.kind)
        else:
            for overrides in table_rows(params, protocol, tname).values():
                add(proto.ablation_dataset, params.grid.ablation_method, overrides, table.kind)
    return list(runs.values())


def _strip_defaults(params: Params, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop overrides equal to the method's defaults, so the default is one variant."""
    defaults = _model_defaults(params, method)
    out = {}
    for k, v in overrides.items():
        norm = list(v) if isinstance(v, tuple) else v
        d = defaults.get(k)
        d = list(d) if isinstance(d, tuple) else d
        if k == "pretrained" or norm != d:
            out[k] = norm
    if set(out) == {"pretrained"}:
        return {}
    return out


@cache
def _defaults_for(builder: str) -> dict[str, Any]:
    cls = _import(builder)
    cfg_cls = getattr(cls, "config_class", None)
    return cfg_cls().model_dump() if cfg_cls else {}


def _model_defaults(params: Params, method: str) -> dict[str, Any]:
    spec = params.methods[method]
    base = _defaults_for(spec.builder) if spec.builder else {}
    return {**base, **spec.model}


def _import(spec: str) -> Any:
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------------------------
# The resolved configuration of one run (what the engine trains and what gets hashed).
# --------------------------------------------------------------------------------------------
def resolve_run(params: Params, run: Run) -> RunConfig:
    """The typed configuration of one run (``RunConfig.as_dict()`` is what gets hashed)."""
    proto = params.protocol(run.protocol)
    spec = params.methods[run.method]
    if spec.status != "implemented":
        raise ParamsError(f"method {run.method!r} is {spec.status}, it cannot be trained")
    model = {**spec.model, **spec.protocol_overrides.get(run.protocol, {}), **run.overrides}
    if not proto.pretrained:
        model["pretrained"] = False
    epochs, proto_batch, evaluate_every = proto.schedule(run.method, run.dataset)
    batch = proto_batch or spec.batch_size
    assert spec.optim is not None  # Method requires it when implemented
    return RunConfig.model_validate({
        "run": run.key,
        "protocol": run.protocol,
        "dataset": run.dataset,
        "method": run.method,
        "builder": spec.builder,
        "code": train_code(spec.builder),  # what training runs: an edit retrains (codehash.py)
        "variant": run.variant,
        "seed": run.seed,
        "model": model,
        "image_size": proto.image_size,
        "encoder_bn": "pretrained" if proto.pretrained else proto.random_encoder_bn,
        "epochs": epochs,
        "evaluate_every": evaluate_every,
        # periodic evaluations are part of training's record: a metrics change retrains
        "periodic_eval_code": evaluate_code(spec.builder) if evaluate_every else None,
        "batch_size": batch,
        "eval_batch_size": proto.eval_batch_size,
        "checkpoint_every": proto.checkpoint_every,
        "feature_cache": proto.feature_cache,
        "gpu_options": {"bf16": proto.bf16, "channels_last": proto.channels_last,
                        "compile": proto.compile_backend if proto.compile else False},
        "workers": proto.workers,
        "optim": spec.optim.scaled(batch),
        "categories": params.datasets[run.dataset].get("categories"),
    })


def config_hash(cfg: RunConfig | dict[str, Any]) -> str:
    """16 hex digits of the run's config (as recorded: ``RunConfig.as_dict()``)."""
    if isinstance(cfg, RunConfig):
        cfg = cfg.as_dict()
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_run_key(key: str) -> Run:
    """'protocol/dataset/method/variant/seed' -> Run, with overrides re-derived from params."""
    parts = key.strip("/").split("/")
    if len(parts) != 5:
        raise ParamsError(f"run key {key!r} is not protocol/dataset/method/variant/seed")
    params = load_params()
    seed = int(parts[4].removeprefix("seed"))
    for run in enumerate_runs(params, parts[0]):
        if (run.dataset, run.method, run.variant, run.seed) == (parts[1], parts[2], parts[3], seed):
            return run
    raise ParamsError(f"run {key!r} is not in the {parts[0]!r} grid of params/")


def data_root(dataset: str) -> Path:
    """Raw dataset folder: $OMNIAD_DATA/<dataset> (default data/<dataset>)."""
    return Path(os.environ.get("OMNIAD_DATA", REPO / "data")) / dataset


def cache_dir(dataset: str, size: int) -> Path:
    """Resized uint8 cache of a dataset: $OMNIAD_CACHE/<dataset>-<size> (default cache/)."""
    return Path(os.environ.get("OMNIAD_CACHE", REPO / "cache")) / f"{dataset}-{size}"


def feature_key(cfg: RunConfig) -> dict[str, Any] | None:
    """Everything a run's cached encoder features depend on, or None when the run reads images
    (cache off, or a method whose backbone input is not cacheable). Runs with equal keys share
    one feature cache: the dataset and its categories at this size, the backbone (class,
    arguments, weights tag), the random init's seed when there are no pretrained weights, the
    BatchNorm calibration, the storage precision, the code and library versions that compute
    them. The engine also checks the built
    encoder's state fingerprint against the cache's, so what the key misses cannot pass."""
    if cfg.feature_cache == "off":
        return None
    spec = _import(cfg.builder).backbone_spec(cfg.model)
    if spec is None:
        return None
    kwargs = dict(spec["kwargs"])
    pretrained = kwargs.get("pretrained")
    random_init = pretrained in (None, False)
    if pretrained is True:  # the architecture's default tag: one cache for True and the tag
        from omniad.models.encoder import DEFAULT_TAGS

        arch = kwargs.get("arch", "")
        kwargs["pretrained"] = DEFAULT_TAGS.get(arch, arch)
    from importlib.metadata import version

    from omniad.codehash import fingerprint

    return {"dataset": cfg.dataset, "categories": cfg.categories,
            "image_size": cfg.image_size, "backbone": {**spec, "kwargs": kwargs},
            "init_seed": cfg.seed if random_init else None,
            "encoder_bn": cfg.encoder_bn, "dtype": cfg.feature_cache,
            # the code that computes them (the backbone's module and what it imports) and
            # the libraries whose kernels do: an edit or an upgrade recomputes them
            "code": fingerprint(str(spec["class"]).partition(":")[0], "omniad.engine.features"),
            "versions": {pkg: version(pkg) for pkg in ("torch", "timm")}}


def features_dir(key: dict[str, Any]) -> Path:
    """Where the features of a feature key live: $OMNIAD_CACHE/features/<dataset>-<size>-<hash>."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return features_root() / f"{key['dataset']}-{key['image_size']}-{digest[:12]}"


def features_root() -> Path:
    return Path(os.environ.get("OMNIAD_CACHE", REPO / "cache")) / "features"


def tables_of(params: Params, run: Run) -> list[tuple[str, str]]:
    """(table, row) pairs a run's numbers appear in; the default is in up to eight tables
    (only those whose table kind runs the run's seed)."""
    proto = params.protocol(run.protocol)
    out = []
    for tname in params.grid.table_order:
        table = params.grid.tables[tname]
        if run.seed not in proto.seeds_for(table.kind):
            continue
        if table.kind == "methods":
            if run.variant == "default":
                out.append((tname, run.method))
        elif run.method == params.grid.ablation_method and run.dataset == proto.ablation_dataset:
            for row, overrides in table_rows(params, run.protocol, tname).items():
                if variant_id(_strip_defaults(params, run.method, overrides)) == run.variant:
                    out.append((tname, row))
    return out


# --------------------------------------------------------------------------------------------
# What the workflow needs besides runs: file names, folders, resources, the fetched datasets.
# Snakemake (workflow/rules/*.smk) reads these; it spells none of them.
# --------------------------------------------------------------------------------------------
#: A run's trained model (checkpoint while training) and its evaluation, in :func:`run_dir`.
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"


def manifest_file(dataset: str) -> Path:
    """The manifest a fetched or generated dataset's folder is complete with."""
    from omniad.data.manifest import MANIFEST_NAME

    return data_root(dataset) / MANIFEST_NAME


def cache_key_file(dataset: str, size: int) -> Path:
    """The file a resized cache is complete with (written last by omniad.data.cache)."""
    from omniad.data.cache import KEY_NAME

    return cache_dir(dataset, size) / KEY_NAME


def features_file(key: dict[str, Any] | str) -> Path:
    """The file a feature cache is complete with, by feature key or by folder name."""
    from omniad.engine.features import META

    return (features_root() / key if isinstance(key, str) else features_dir(key)) / META


def check_file(protocol: str, dataset: str) -> Path:
    """The report of ``omniad data check`` on a dataset, per protocol."""
    return results_root() / protocol / "checks" / f"{dataset}.txt"


def summary_file(protocol: str, results: Path | None = None) -> Path:
    """A protocol's summary (mAD per table cell), written by the report for DVC."""
    return (results or results_root()) / protocol / "summary.json"


def tracked_file(protocol: str, results: Path | None = None) -> Path:
    """Marker of the one MLflow sync after a protocol's last evaluation (tracking: at_end)."""
    return (results or results_root()) / protocol / "mlflow-synced"


def dvc_summary_dir() -> Path:
    """summary/ beside results/: the selected protocol's summary under a path that names no
    protocol, for dvc.yaml's metrics and plots."""
    return results_root().parent / "summary"


def reports_root() -> Path:
    """reports/ of this checkout, or $OMNIAD_REPORTS."""
    return Path(os.environ.get("OMNIAD_REPORTS", REPO / "reports"))


def report_dir(protocol: str, reports: Path | None = None) -> Path:
    return (reports or reports_root()) / protocol


def report_table_file(protocol: str, table: str, reports: Path | None = None) -> Path:
    """One table of the report, as LaTeX (``omniad report`` writes one per grid table)."""
    return report_dir(protocol, reports) / "tables" / f"{table}.tex"


def report_tex_file(protocol: str, reports: Path | None = None) -> Path:
    """The report's LaTeX source, written after every table and figure."""
    return report_dir(protocol, reports) / "report.tex"


def resources(proto: Protocol, kind: str) -> Resources:
    """A protocol's resources for a kind of job (train / prepare / light); the defaults of
    :class:`Resources` where the protocol names none."""
    return proto.resources.get(kind) or Resources()


def fetched_datasets(params: Params) -> list[str]:
    """Datasets that are downloaded (``omniad data fetch``), not generated like the demo set."""
    return [d for d, spec in params.datasets.items() if not (spec or {}).get("generated")]
