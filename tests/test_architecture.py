"""The package's shape, read off the source: one import namespace, and imports that point one way.

    ratequeue.errors                      imports nothing of ours
    ratequeue.config                      errors only
    shared (jobstore, tokens, queue, broker, redact, redis_tls)
                                          errors, config and each other
    ratequeue.worker / ratequeue.producer the above; the producer never loads the worker runtime
    ratequeue.sim                         nothing of ours but itself
No module anywhere imports the folders by their bare names (``worker``, ``config``, ...): installed,
only ``ratequeue`` exists, and a second name for one module would load it twice.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "ratequeue"
SHARED = ("ratequeue.jobstore", "ratequeue.tokens", "ratequeue.queue", "ratequeue.broker", "ratequeue.redact",
          "ratequeue.retrying",
          "ratequeue.redis_tls")
# What running a worker means: the producer (and a service importing ratequeue) must not load it.
WORKER_RUNTIME = ("ratequeue.worker.app", "ratequeue.worker.tasks", "ratequeue.worker.engine",
                  "ratequeue.worker.runner", "ratequeue.worker.__main__")
ALLOWED: dict[str, tuple[str, ...]] = {
    "ratequeue.errors": (),
    "ratequeue.config": ("ratequeue.errors", "ratequeue.config"),
    **{shared: ("ratequeue.errors", "ratequeue.config", *SHARED) for shared in SHARED},
    "ratequeue.sim": ("ratequeue.sim",),
}


FOLDERS = ("config", "worker", "producer", "sim")  # top-level folders, symlinked into ratequeue/


def _module_name(path: Path) -> str:
    """``ratequeue/jobstore/keys.py`` -> ``ratequeue.jobstore.keys``; ``worker/app.py`` -> ``ratequeue.worker.app``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in FOLDERS:
        parts.insert(0, "ratequeue")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_files() -> list[Path]:
    """ratequeue/ and the folders (whether or not rglob follows the symlinks: names deduplicate)."""
    files = [*PACKAGE.rglob("*.py"), *(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))]
    return [p for p in files if "__pycache__" not in p.parts]


def _modules() -> dict[str, Path]:
    """Every module of the package, by its name in the namespace."""
    return {_module_name(p): p for p in _package_files()}


def _imports(path: Path, name: str) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _ours(imported: set[str]) -> set[str]:
    return {m for m in imported if m == "ratequeue" or m.startswith("ratequeue.")}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _known(imported: str, modules: dict[str, Path]) -> str:
    """The longest module name among ``modules`` that ``imported`` names (``a.b.name`` -> ``a.b``)."""
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if not _within(name, (layer,)) or name == "ratequeue":
            continue
        for imported in _ours(_imports(path, name)):
            target = _known(imported, modules)
            if target and not _within(target, ALLOWED[layer]):
                bad.append(f"{name} imports {target}")
    assert bad == []


def test_the_producer_never_loads_the_worker_runtime() -> None:
    modules = _modules()
    bad = [f"{name} imports {_known(i, modules)}" for name, path in modules.items()
           if _within(name, ("ratequeue.producer",))
           for i in _ours(_imports(path, name)) if _within(_known(i, modules), WORKER_RUNTIME)]
    assert bad == []


def test_the_worker_never_imports_the_producer() -> None:
    modules = _modules()
    bad = [f"{name} imports {i}" for name, path in modules.items() if _within(name, ("ratequeue.worker",))
           for i in _ours(_imports(path, name)) if _within(i, ("ratequeue.producer",))]
    assert bad == []


def test_nothing_imports_the_folders_by_their_bare_names() -> None:
    bare = ("worker", "producer", "config", "sim")
    files = [*_package_files(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
             *(ROOT / "ops").rglob("*.py")]
    bad = []
    for path in files:
        for imported in _imports(path, _module_name(path)):
            if imported.split(".")[0] in bare:
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert bad == []


def test_the_folders_are_the_namespace() -> None:
    """ratequeue/<folder> is the repository's top-level folder, not a copy."""
    for folder in ("config", "worker", "producer", "sim"):
        link = PACKAGE / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), folder
