"""The installed package imports one way only: each layer imports the layers below it, never above,
and no two modules import each other, directly or around a loop (function-local imports count).

    top        lverse.cli, lverse.demo, lverse.run, lverse.plans   commands; compose stages
    launchers  lverse.slurm                                        job scripts, from a stage's plan
    stages     lverse.pipeline.*                                   one module a stage; none imports another
                                                                   (but lverse.pipeline.configs: their options)
    runtime    lverse.runtime.*                                    executors, stage runner, ranks, training core
    models     lverse.model.*, lverse.preprocessing.*              torch modules, tokenizer, synthetic data
                                                                   (lverse.model.* no preprocessing)
    core       lverse.core.*, lverse.ds_configs                    files, configs, shards, devices

A launcher knows no stage (a stage's plan reaches it from lverse.plans), so lverse.slurm may
import only the core and the runtime.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil

LAYERS = ("core", "models", "runtime", "stages", "launchers", "top")
PACKAGE_LAYER = {"lverse.core": "core", "lverse.ds_configs": "core", "lverse.model": "models",
                 "lverse.preprocessing": "models", "lverse.runtime": "runtime", "lverse.pipeline": "stages",
                 "lverse.slurm": "launchers"}
ALLOWED_BELOW = {"launchers": {"core", "runtime"}}  # beside the rank order
CONFIGS = "lverse.pipeline.configs"  # every stage's options: any stage may import it, it imports none


def layer_of(module: str) -> str:
    for package, layer in PACKAGE_LAYER.items():
        if module == package or module.startswith(package + "."):
            return layer
    return "top"


def installed_packages() -> list[str]:
    """The packages setup.py installs (each folder of the repository is its own ``lverse.*`` package)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "setup.py")) as f:
        call = next(n for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.Call)
                    and any(k.arg == "packages" for k in n.keywords))
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages"))


def package_modules() -> dict[str, str]:
    """Module name -> source file of every Python module of the installed lverse packages (a C
    extension, preprocessing/_bpe.c, imports no lverse module)."""
    modules = {}
    for package in installed_packages():
        modules[package] = importlib.import_module(package).__file__
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
            origin = importlib.util.find_spec(info.name).origin
            if not info.ispkg and origin.endswith(".py"):
                modules[info.name] = origin
    return modules


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The lverse modules ``name`` imports anywhere in its file, relative imports resolved."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from lverse.model import augvae` imports a module; `from .shards import x` a name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import lverse.core.files as f` -> the module itself
                target = target.rpartition(".")[0]
            if target and target != name and target != "lverse":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up or sideways where it may not, and every cycle."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if rank[theirs] > rank[mine]:
                found.append(f"{module} ({mine}) imports {target} ({theirs}): an upward import")
            elif mine == "stages" and theirs == "stages" and "lverse.pipeline" not in (module, target) \
                    and target != CONFIGS:
                found.append(f"{module} imports {target}: a stage imports another stage")
            elif module.startswith("lverse.model.") and not (theirs == "core" or target.startswith("lverse.model")):
                found.append(f"{module} imports {target}: a model imports lverse's core and models only")
            elif mine in ALLOWED_BELOW and theirs != mine and theirs not in ALLOWED_BELOW[mine]:
                allowed = sorted(ALLOWED_BELOW[mine])
                found.append(f"{module} ({mine}) imports {target} ({theirs}): allowed are {allowed}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [group + [group[0]] for group in groups]


def test_the_package_imports_one_way_only():
    assert set(installed_packages()) == {"lverse", *PACKAGE_LAYER}  # every package has its layer
    graph = import_graph()
    assert {"lverse.core.shards", "lverse.runtime.stage", "lverse.runtime.tasks", "lverse.runtime.local_pool",
            "lverse.runtime.lifetime", "lverse.runtime.ray_cluster", "lverse.runtime.ray_tasks",
            "lverse.runtime.token_index", "lverse.runtime.token_index_build", "lverse.pipeline.encode",
            "lverse.slurm.render", "lverse.cli"} <= set(graph)
    assert "lverse.core.shards" in graph["lverse.pipeline.encode"]  # relative and absolute imports are read
    assert violations(graph) == []


def test_the_checker_finds_cycles_and_upward_imports():
    graph = {"lverse.core.files": {"lverse.model.cache"}, "lverse.model.cache": {"lverse.core.files"},
             "lverse.pipeline.caption": {"lverse.pipeline.encode"}, "lverse.pipeline.encode": set(),
             "lverse.slurm.render": {"lverse.pipeline.caption"},
             "lverse.model.biart": {"lverse.preprocessing.text_tokenizer", "lverse.core.vocab"}}
    found = violations(graph)
    assert "lverse.core.files (core) imports lverse.model.cache (models): an upward import" in found
    assert "lverse.pipeline.caption imports lverse.pipeline.encode: a stage imports another stage" in found
    assert any(v.startswith("lverse.slurm.render (launchers) imports lverse.pipeline.caption") for v in found)
    assert "import cycle: lverse.core.files -> lverse.model.cache -> lverse.core.files" in found
    assert ("lverse.model.biart imports lverse.preprocessing.text_tokenizer: a model imports lverse's core and models "
            "only") in found
    assert not any("lverse.core.vocab" in v for v in found)
