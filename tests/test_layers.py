"""The package's layers point down: no import cycle, nothing imported from a higher layer, and no
function-local import of the package hiding a dependency (lazy imports of optional third-party
packages are fine). Read from the source with `ast`, so it needs no import to run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "birefnet_jax"

# Lowest first. A module may import its own layer's modules (no cycles, checked below) and any lower
# layer. Prefixes match a module and everything under it.
LAYERS: list[tuple[str, ...]] = [
    ("birefnet_jax._optional", "birefnet_jax.io"),  # files, images, resizes: numpy / PIL only
    ("birefnet_jax.nn",),  # layers, BatchNorm, deformable conv, remat, scan, state utilities
    ("birefnet_jax.backbones",),  # one file per family, the registry, key filters
    ("birefnet_jax.config",),
    ("birefnet_jax.pretrained",),  # the released checkpoints: names, files, training settings
    ("birefnet_jax.modules",),  # decoder, blocks, ASPP
    ("birefnet_jax.model",),
    ("birefnet_jax.convert", "birefnet_jax.checkpoint"),  # foreign weights; Orbax model checkpoints
    ("birefnet_jax.loading",),  # any checkpoint -> model
    ("birefnet_jax.metrics",),
    ("birefnet_jax.inference", "birefnet_jax.train"),  # siblings: neither imports the other
    ("birefnet_jax.verify",),
    ("birefnet_jax.cli", "birefnet_jax.__main__", "birefnet_jax"),  # entry points and the public names
]


# Package parts that need an extra (metrics: the `eval` packages; train: the `train` ones). The entry
# points may import them lazily, inside the command that needs them, like any optional package.
OPTIONAL_PARTS = ("birefnet_jax.metrics", "birefnet_jax.train")
ENTRY_POINTS = ("birefnet_jax.cli", "birefnet_jax.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> tuple[int, str]:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _resolve(module: str, node: ast.ImportFrom, is_package: bool, known: set[str]) -> list[str]:
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("birefnet_jax"):
        return []
    # `from birefnet_jax.x import y` where y is a submodule depends on that submodule, not on x's names
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return subs if len(subs) == len(node.names) else [target, *subs]


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """module -> package modules it imports at module level; and the function-local imports."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: list[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                         and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                         for n in ast.walk(node)}
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, node, path.name == "__init__.py", known)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("birefnet_jax")]
            else:
                continue
            if not targets:
                continue
            optional = module in ENTRY_POINTS and all(t.startswith(OPTIONAL_PARTS) for t in targets)
            if id(node) not in top and not optional:
                local.append(f"{module}:{node.lineno} imports {targets[0]} inside a function")
            graph[module] |= {t for t in targets if t != module}
    return graph, local


def test_no_function_local_package_imports():
    _, local = _imports()
    assert not local, "\n".join(local)


def test_imports_only_point_down():
    graph, _ = _imports()
    upward = []
    for module, targets in graph.items():
        rank, _ = _layer(module)
        for target in targets:
            if target == "birefnet_jax" and module != "birefnet_jax":
                upward.append(f"{module} imports the package root (every public name): import the module instead")
                continue
            target_rank, _ = _layer(target)
            if target_rank > rank:
                upward.append(f"{module} (layer {rank}) imports {target} (layer {target_rank})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph, _ = _imports()
    edges = graph
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)
