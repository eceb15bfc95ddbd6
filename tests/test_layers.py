"""One direction of dependency. The method scripts stand on plumbing/ and common.py; plumbing/ on
common.py and itself, never on a script; common.py (the shared math and networks) on nothing of the
project. Read from the source, so that an import inside a function counts like one at the top."""

import ast
import importlib
import inspect
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "common")  # the method files, train_teacher, evaluate
CODE = [ROOT / "common.py", *sorted((ROOT / "plumbing").glob("*.py")), *(ROOT / f"{s}.py" for s in SCRIPTS)]
OTHERS = ["exercises", "tools", "tests", "notebooks"]  # above the scripts: they may import anything below


def layer(module: str) -> int | None:
    """0 common, 1 the plumbing, 2 a script, 3 exercises, tools, tests; None: not the project's."""
    top = module.split(".")[0]
    return {"common": 0, "plumbing": 1, **dict.fromkeys(SCRIPTS, 2), **dict.fromkeys(OTHERS, 3)}.get(top)


def layer_of(path: Path) -> int:
    return 0 if path.name == "common.py" else 1 if path.parent.name == "plumbing" else 2


def imports(tree: ast.AST) -> list[tuple[str, list[str], int, bool]]:
    """(module, names, line, inside a function) of every import statement, however deep."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:  # relative: only the plumbing package has submodules
                    module = "plumbing" + (f".{module}" if module else "")
                found.append((module, [alias.name for alias in child.names], child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def targets(module: str, names: list[str]) -> list[str]:
    """The project modules an import statement reaches: `from plumbing import distributed` reaches
    plumbing.distributed."""
    if module == "plumbing" and names:
        return [f"plumbing.{name}" for name in names]
    return [module]


def test_every_arrow_points_down():
    up = []
    for path in CODE:
        for module, names, line, _ in imports(ast.parse(path.read_text())):
            for target in targets(module, names):
                below = layer(target)
                if below is None:
                    continue
                if layer_of(path) == 0 or below > layer_of(path):
                    up.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_no_import_of_the_project_inside_a_function():
    # A module-level import is the one place a dependency shows; one inside a function hides it (and a cycle).
    hidden = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in CODE
              for module, names, line, inside in imports(ast.parse(path.read_text()))
              if inside and layer(module) is not None]
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


def test_no_re_exports():
    # An import kept only to be imported from here again is marked `noqa: F401`; none is in the code. (The one
    # import kept for what importing does: plumbing.interrupt, first in every script, tests/test_bad_inputs.py.)
    marked = [f"{path.relative_to(ROOT)}:{i}" for path in CODE
              for i, line in enumerate(path.read_text().splitlines(), 1)
              if "noqa" in line and "F401" in line and not line.startswith("import plumbing.interrupt  #")]
    assert not marked, marked


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()
             if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def test_every_name_is_imported_from_its_home():
    # Each function and class has one home, and everyone (scripts, plumbing, tests, tools, exercises and
    # notebooks) imports it from there.
    files = [*CODE, *sorted(ROOT.glob("tests/*.py")), *sorted(ROOT.glob("tools/*.py")),
             *sorted(ROOT.glob("exercises/*.py"))]
    sources = {path: path.read_text() for path in files}
    sources.update({path: notebook_code(path) for path in sorted(ROOT.glob("notebooks/*.ipynb"))})
    assert len(sources) > len(CODE) + 10
    elsewhere = []
    for path, source in sources.items():
        for module, names, line, _ in imports(ast.parse(source)):
            if layer(module) is None or layer(module) == 3 or not names:
                continue
            home = importlib.import_module(module)
            for name in names:
                obj = getattr(home, name, None)
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ != module:
                    elsewhere.append(f"{path.relative_to(ROOT)}:{line} imports {name} from {module}, "
                                     f"its home is {obj.__module__}")
    assert not elsewhere, "\n".join(elsewhere)
