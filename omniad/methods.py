"""The public way to build a method by name: ``create_method`` / ``list_methods``.

The habit of timm's ``create_model`` and anomalib's ``get_model``: a method is named by its
file in ``params/methods/`` (``$OMNIAD_PARAMS`` elsewhere); its ``builder`` names the class and
its ``model`` block the released configuration, which keyword overrides refine. The runner,
the complexity table, the report's audit, benchmarks and tests all build methods here, so
there is one path from params to a model. It lives outside ``omniad/models`` because it reads
params (``omniad.grid``), which models never import.
"""

from __future__ import annotations

import importlib
from typing import Any

from omniad.data.files import DataFiles
from omniad.grid import Params, ParamsError, load_params
from omniad.models.base import ADMethod


def list_methods(params: Params | None = None) -> list[str]:
    """Names of the methods that can be built (``status: implemented``), in table order."""
    return (params or load_params()).implemented()


def method_class(name: str, params: Params | None = None) -> type[ADMethod]:
    """The ADMethod subclass a method's ``builder`` names (``module:Class``)."""
    params = params or load_params()
    where = f"{params.root / 'methods' / (name + '.yaml')}"
    spec = params.methods.get(name)
    if spec is None:
        raise ParamsError(f"{params.root / 'methods'}: no method {name!r} (known: "
                          f"{sorted(params.methods)})")
    if spec.status != "implemented" or not spec.builder:
        raise ParamsError(f"{where}: method {name!r} is {spec.status}, it has no model to build "
                          f"(implemented: {list_methods(params)})")
    module, _, attr = spec.builder.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ParamsError(f"{where}: builder {spec.builder!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ADMethod)):
        raise ParamsError(f"{where}: builder {spec.builder!r} is not an ADMethod subclass")
    return cls


def create_method(name: str, **overrides: Any) -> ADMethod:
    """Build method ``name``: its params ``model`` block with ``overrides`` merged over it
    (validated by the method's config class). The caller seeds the RNG: the init is random."""
    params = load_params()
    model = method_class(name, params)(**{**params.methods[name].model, **overrides})
    model.bind_data(DataFiles())
    return model
