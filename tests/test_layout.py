"""The shape of the package, parsed with `ast` (nothing imported): one folder per idea, each a floor; imports between
floors only go down, into a subpackage only through the names its `__init__` exports; no import circle; no module
past 500 lines, no subpackage past ~3,000, at most 10 modules at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwentune"
MAX_LINES = 500
MAX_PACKAGE_LINES = 3000
MAX_TOP_MODULES = 10
# Bottom to top. A place may import from its own floor's subpackage and from any lower floor, never from above.
FLOORS = (
    ("errors", "logs", "quiet", "files", "lazy"),
    ("recipe", "patches"),
    ("rows",),
    ("data",),
    ("model",),
    ("export",),
    ("serve",),
    ("eval",),
    ("training",),
    ("api", "cli", "cli_args", "__main__", "__init__"),
)
FLOOR = {place: level for level, places in enumerate(FLOORS) for place in places}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_nodes(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in the file, at any depth (function-level too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The qwentune modules `name` imports (a package's `__init__` counts as the package)."""
    targets: set[str] = set()
    for base, names, _ in import_nodes(name, path):
        for target in [base] + [f"{base}.{n}" for n in names]:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a package's own face (`qwentune`) and a module's own parent package are not edges
            if target and target != name and target != "qwentune" and not name.startswith(target + "."):
                targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def place_of(module: str) -> str:
    """The floor's place a module belongs to: its subpackage, or its own name at the top of qwentune/."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def subpackages() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def exported(package: str) -> dict[str, str]:
    """{name: module} a subpackage's `__init__` exports (the dict handed to `lazy.exports`)."""
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "exports":
            table = ast.literal_eval(node.args[1])
            found.update({n: module for module, names in table.items() for n in names})
    return found


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_qwentune_modules():
    edges = graph()
    assert "qwentune.training.sft" in edges and edges["qwentune.training.sft"], "the graph reads the package's imports"
    found = circles(edges)
    detail = [" -> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(edges[m] & set(c))}" for m in c) for c in found]
    assert not found, "\n".join(detail)


def test_every_place_is_on_a_floor():
    places = {place_of(m) for m in modules()}
    assert places - set(FLOOR) == set(), "a new subpackage or top-level module: put it on a floor in FLOORS"
    assert set(subpackages()) <= set(FLOOR)


def climbs(here: str, there: str) -> bool:
    """Up a floor; or across one floor between two subpackages (modules at the top of a floor may use each other)."""
    if FLOOR[there] != FLOOR[here]:
        return FLOOR[there] > FLOOR[here]
    return there in subpackages() or here in subpackages()


def test_climbs_reads_the_floors():
    assert climbs("data", "model") and not climbs("model", "data") and climbs("recipe", "patches")
    assert not climbs("files", "logs") and not climbs("cli", "api") and not climbs("training", "errors")


def test_imports_between_places_only_go_down_and_no_circle_between_subpackages():
    edges = graph()
    up = sorted(
        f"{m} imports {t}"
        for m, targets in edges.items()
        for t in targets
        if place_of(m) != place_of(t) and climbs(place_of(m), place_of(t))
    )
    assert not up, "imports that climb a floor (or cross to a subpackage on the same floor):\n" + "\n".join(up)
    between = {}
    for m, targets in edges.items():
        between.setdefault(place_of(m), set()).update(place_of(t) for t in targets if place_of(t) != place_of(m))
    assert not circles(between)


def test_a_subpackage_is_entered_only_through_its_exports():
    """From outside a subpackage: `from qwentune.data import prepare_data` (a name its __init__ exports), never
    `from qwentune.data.pipeline import ...` nor a name the __init__ does not export."""
    tables = {p: exported(p) for p in subpackages()}
    bad = []
    for name, path in modules().items():
        here = place_of(name)
        for base, names, line in import_nodes(name, path):
            parts = base.split(".")
            if parts[0] != "qwentune":
                continue
            if len(parts) == 1:  # from qwentune import patches / from .. import patches
                entered = [(n, None) for n in names if n in tables and n != here]
            elif parts[1] in tables and parts[1] != here:
                if len(parts) > 2:
                    bad.append(f"{path.relative_to(PACKAGE)}:{line} reaches into {base}")
                    continue
                entered = [(parts[1], n) for n in names]
            else:
                continue
            for package, n in entered:
                if n is not None and n not in tables[package]:
                    where = f"{path.relative_to(PACKAGE)}:{line}"
                    bad.append(f"{where} imports {n!r}, which qwentune.{package} does not export")
    assert not bad, "\n".join(bad)


def test_every_export_is_defined_in_the_module_it_names_and_is_not_a_module_name():
    bad = []
    for package in subpackages():
        table = exported(package)
        assert table, f"qwentune.{package}.__init__ exports nothing"
        for n, module in table.items():
            path = PACKAGE / package / f"{module}.py"
            if not path.is_file() or n not in defined_names(path):
                bad.append(f"qwentune.{package} exports {n} from {module}, which does not define it")
            if (PACKAGE / package / f"{n}.py").is_file():
                bad.append(f"qwentune.{package} exports {n}, also one of its modules (importing it would replace it)")
    assert not bad, "\n".join(bad)


def test_the_entry_check_finds_a_reach_into_a_subpackage(tmp_path):
    """The two checks above read what they should: a reach into data.pipeline and an unexported name are found."""
    assert "prepare_data" in exported("data") and "map_rows" not in exported("data")
    sample = tmp_path / "x.py"
    sample.write_text("from ..data.pipeline import prepare_data\nfrom ..data import map_rows\n", encoding="utf-8")
    found = import_nodes("qwentune.training.x", sample)
    assert found == [("qwentune.data.pipeline", ["prepare_data"], 1), ("qwentune.data", ["map_rows"], 2)]


def test_no_module_over_500_lines():
    sizes = {name: path.read_text(encoding="utf-8").count("\n") for name, path in modules().items()}
    assert max(sizes.values()) > 0
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"


def test_subpackages_stay_small_and_the_top_holds_only_the_faces():
    sizes = {
        p: sum(f.read_text(encoding="utf-8").count("\n") for f in (PACKAGE / p).rglob("*.py")) for p in subpackages()
    }
    big = {p: n for p, n in sizes.items() if n > MAX_PACKAGE_LINES}
    assert not big, f"subpackages over {MAX_PACKAGE_LINES} lines (split by idea): {big}"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
