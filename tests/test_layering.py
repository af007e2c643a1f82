"""The package's import graph points one way: no module imports another that (directly or
through others) imports it back, anywhere in a function body included; ``core`` imports nothing
above it; whole-model tools are never imported by the layers they transform."""

import ast
import pathlib

import batchnorm

ROOT = pathlib.Path(batchnorm.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            targets.update(t for t in found if t in modules and t != name)
        graph[name] = targets
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _without_packages(graph):
    """Package ``__init__`` files re-export their children: an edge from a package to its own
    submodule and back is how Python packages work, not a layering cycle."""
    return {
        name: {t for t in targets if not t.startswith(name + ".")}
        for name, targets in graph.items()
    }


def test_no_import_cycles():
    assert _cycles(_without_packages(_graph())) == []


def test_core_imports_nothing_above_it():
    for name, targets in _graph().items():
        if name.startswith("batchnorm.core"):
            above = sorted(t for t in targets if not t.startswith("batchnorm.core"))
            assert above == [], f"{name} imports {above}"


def test_layers_never_import_whole_model_tools():
    tools = {"batchnorm.convert", "batchnorm.variants.fold", "batchnorm.variants.precise"}
    for name, targets in _graph().items():
        if name.startswith(("batchnorm.modules", "batchnorm.functional", "batchnorm.autograd",
                            "batchnorm.dispatch", "batchnorm.backends", "batchnorm.core")):
            assert not targets & tools, f"{name} imports {sorted(targets & tools)}"


def test_the_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
