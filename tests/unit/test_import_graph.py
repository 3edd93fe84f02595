"""The package's import graph, read with `ast` (nothing imported): no cycles, no module importing a higher layer.

Every `import` / `from ... import` counts, relative or absolute, at module level or inside a
function. An edge goes to the module named (`from .x import y` -> x, or x.y when y is a module);
the package root `megatron_ru/__init__.py` (lazy names only) is exempt. Layers, bottom to top:
a module may import its own layer or lower ones (DESIGN.md section 2, the refactoring notes).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_ru"
ROOT_MODULE = "megatron_ru"
LAYERS = {  # module or package -> layer
    "megatron_ru.errors": 0, "megatron_ru.launch": 0, "megatron_ru.sparse_config": 0, "megatron_ru.files": 0,
    "megatron_ru.threads": 0,
    "megatron_ru.config": 1, "megatron_ru.runtime": 1,
    "megatron_ru.data": 2, "megatron_ru.parallel": 2,
    "megatron_ru.model": 3,
    "megatron_ru.checkpoint": 4,
    "megatron_ru.inference": 5, "megatron_ru.planning": 5,  # planning: shapes from config/model, configs from checkpoint
    "megatron_ru.evaluation": 6, "megatron_ru.serving": 6,
    "megatron_ru.training": 7,
}


def package_modules(package: Path = PACKAGE) -> dict:
    """Dotted module name -> file, for every .py under `package` (a package's name for its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict):
    """`name` or its closest enclosing module of ours; None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict) -> list:
    """[(line, imported module)] for every import statement in the file, wherever it stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target and target not in (module, ROOT_MODULE):
                found.append((node.lineno, target))
    return found


def import_graph(modules: dict) -> dict:
    """module -> {imported module: first line}; the exempt package root has no entry."""
    graph = {}
    for module, path in modules.items():
        if module == ROOT_MODULE:
            continue
        edges = graph.setdefault(module, {})
        for line, target in imports_of(module, path, modules):
            edges.setdefault(target, line)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer_of(module: str):
    keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return LAYERS[max(keys, key=len)] if keys else None


def upward_imports(graph: dict, modules: dict, root: Path = PACKAGE.parent) -> list:
    """'file:line: a (layer i) imports b (layer j > i)' for every import of a higher layer."""
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items(), key=lambda e: e[1]):
            mine, theirs = layer_of(module), layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                where = modules[module].relative_to(root)
                found.append(f"{where}:{line}: {module} (layer {mine}) imports {target} (layer {theirs})")
    return found


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    modules = package_modules()
    graph = import_graph(modules)
    assert len(graph) == len(modules) - 1 > 50
    # `from ..errors import UsageError` (relative, two dots) in a data module
    assert "megatron_ru.errors" in graph["megatron_ru.data.indexed_dataset"]
    # `from .. import runtime` names a module, not the package root
    assert "megatron_ru.runtime" in graph["megatron_ru.training.trainer"]
    # the data package's lazy `from . import batch` sits inside a function
    assert "megatron_ru.data.batch" in graph["megatron_ru.data"]


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """A small package with the faults planted: a function-level import closing a cycle through a
    subpackage, and a layer-2 module importing layer 3."""
    pkg = tmp_path / "megatron_ru"
    files = {"__init__.py": "from .model import gpt\n",
             "errors.py": "",
             "data/__init__.py": "",
             "data/a.py": "from ..errors import x\nfrom . import b\n",
             "data/b.py": "def f():\n    from megatron_ru.data.a import y\n",
             "data/c.py": "import megatron_ru.model.gpt as gpt\n",
             "model/__init__.py": "",
             "model/gpt.py": "from ..data import a\n"}
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    modules = package_modules(pkg)
    graph = import_graph(modules)
    assert "megatron_ru" not in graph  # the root is exempt
    assert cycles(graph) == [["megatron_ru.data.a", "megatron_ru.data.b"]]
    assert upward_imports(graph, modules, tmp_path) == [
        "megatron_ru/data/c.py:1: megatron_ru.data.c (layer 2) imports megatron_ru.model.gpt (layer 3)"]


def test_every_module_has_a_layer():
    unplaced = [m for m in package_modules() if m != ROOT_MODULE and layer_of(m) is None]
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"


def test_no_import_cycles():
    found = cycles(import_graph(package_modules()))
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_imports_a_higher_layer():
    modules = package_modules()
    found = upward_imports(import_graph(modules), modules)
    assert not found, f"{len(found)} upward import(s):\n" + "\n".join(found)
