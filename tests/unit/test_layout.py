"""The architecture as the import graph shows it: data flows one way (source -> decode ->
encode -> store/index -> collection -> faces), so no module imports one that imports it back,
even through an import inside a function, and the lower floors never import the faces or
torch. Read from the source files (the AST), so that it holds for code no test runs."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "clipsearch"
TORCH = ("torch", "open_clip", "transformers", "torchvision")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function, but not the imports
    under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:  # `from . import x` imports the module x
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for target in imports(name, path, known):
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_graph_sees_a_cycle():
    """The check itself: a cycle made on purpose is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "clipsearch.store" in graph()["clipsearch.collection"]


def test_lower_floors_never_import_the_faces():
    """Only the command line (and ``python -m clipsearch``) imports the command line; only the
    command line and the server import the server."""
    for name, targets in graph().items():
        if not name.startswith(("clipsearch.cli", "clipsearch.__main__")):
            assert not any(t.startswith("clipsearch.cli") for t in targets), name
        if not name.startswith(("clipsearch.cli", "clipsearch.server")):
            assert not any(t.startswith("clipsearch.server") for t in targets), name


def test_the_store_index_and_settings_never_import_torch():
    known = modules()
    for name, path in known.items():
        if name.startswith(("clipsearch.store", "clipsearch.index", "clipsearch.settings", "clipsearch.filters")):
            torch = {t for t in imports(name, path, known) if t.split(".")[0] in TORCH}
            assert torch == set(), name


# The floors the data flows down through. A module imports its own floor or lower ones; an
# arrow up needs a line in UPWARD saying why.
FLOORS = [
    ("primitives", ("clipsearch", "clipsearch._compat", "clipsearch.errors", "clipsearch.settings",
                    "clipsearch.identity", "clipsearch.imaging", "clipsearch.filters", "clipsearch.files",
                    "clipsearch.choice", "clipsearch.tokenizer", "clipsearch.keywords")),
    ("encoders and store", ("clipsearch.encoders", "clipsearch.store", "clipsearch.index", "clipsearch.fetch",
                            "clipsearch.download_cache", "clipsearch.decode_stage", "clipsearch.sources",
                            "clipsearch.catalog", "clipsearch.source_spec")),
    ("pipeline and search", ("clipsearch.pipeline", "clipsearch.distributed", "clipsearch.sync",
                             "clipsearch.search", "clipsearch.export", "clipsearch.imports", "clipsearch.table_worker",
                             "clipsearch.models")),
    ("collection", ("clipsearch.collection",)),
    ("faces", ("clipsearch.cli", "clipsearch.server", "clipsearch.watch", "clipsearch.evaluate",
               "clipsearch.__main__")),
]  # fmt: skip
# (importer, imported): why the arrow goes up. The package root is a primitive: it imports
# nothing when run (its names load lazily), and the faces read ``__version__`` from it.
UPWARD: dict[tuple[str, str], str] = {}


def floor(module: str) -> int:
    # the longest prefix decides: ``clipsearch`` (the root) is a primitive, its subpackages are not
    best = max(
        ((len(p), i) for i, (_, prefixes) in enumerate(FLOORS) for p in prefixes
         if module == p or module.startswith(p + ".")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[1]


def test_imports_go_down_the_floors():
    up = [
        (a, t) for a, targets in sorted(graph().items()) for t in sorted(targets)
        if floor(t) > floor(a) and (a, t) not in UPWARD
    ]  # fmt: skip
    assert up == [], "imports that go up a floor: " + ", ".join(f"{a} -> {t}" for a, t in up)
    assert len(UPWARD) <= 2


def test_every_module_is_on_a_floor():
    for name in modules():
        floor(name)
    assert floor("clipsearch") == 0 and floor("clipsearch.cli.ingest") == 4
