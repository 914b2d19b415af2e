"""Find model variants by name: 'merged', 'v3', 'mutants/<name>', or a path to a .py file.

A model module defines `MODEL`, an object with the methods of
`kvmsplit.split.MergedSplit` (usually a subclass overriding one or two of
them), and a docstring whose first line says what it changes.  Mutants also
define `SHORTEST_TRACE`, the length of the shortest trace that exposes them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

from kvmsplit.errors import HarnessError


def _module(name: str) -> ModuleType:
    if name.endswith(".py") or ("/" in name and Path(name).exists()):
        path = Path(name)
        if not path.is_file():
            raise HarnessError(f"model file {name!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"kvmsplit_model_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise HarnessError(f"model file {name!r} cannot be imported")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    dotted = name.replace("/", ".")
    if not all(part.isidentifier() for part in dotted.split(".")):
        raise HarnessError(f"model name {name!r} is not 'merged', 'v3', 'mutants/<name>' or a .py path")
    try:
        return importlib.import_module(f"kvmsplit.models.{dotted}")
    except ModuleNotFoundError:
        raise HarnessError(f"no model named {name!r}; `kvmsplit models` lists them") from None


def load_model(name: str) -> Any:
    mod = _module(name)
    model = getattr(mod, "MODEL", None)
    if model is None:
        raise HarnessError(f"model {name!r} defines no MODEL")
    return model


def model_module(name: str) -> ModuleType:
    return _module(name)


def list_models() -> list[str]:
    import kvmsplit.models as models_pkg
    import kvmsplit.models.mutants as mutants_pkg

    names = [m.name for m in pkgutil.iter_modules(models_pkg.__path__) if not m.ispkg]
    names += [f"mutants/{m.name}" for m in pkgutil.iter_modules(mutants_pkg.__path__)]
    order = {"merged": 0, "v3": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))
