"""The layout keeps the architecture's rules (README "Layout"): who may import whom, no import
cycles, no imports hidden in functions to dodge one, and rooms of a readable size."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"adapters": "hotpeft.adapters", "model": "hotpeft.model", "server": "hotpeft.server",
            "trainer": "hotpeft.trainer", "cli": "hotpeft.cli"}
# package -> the packages of ours it may import
ALLOWED = {
    "model": set(),
    "adapters": {"model"},
    "trainer": {"adapters", "model"},
    "server": {"adapters", "model", "trainer"},
    "cli": {"adapters", "model", "server", "trainer"},
}
# The server uses the trainer only for the fine-tuning jobs API: records, manager, configuration
# and file checks; never the training code itself.
SERVER_MAY_USE_FROM_TRAINER = ("hotpeft.trainer.jobs", "hotpeft.trainer.errors", "hotpeft.trainer.config",
                               "hotpeft.trainer.data", "hotpeft.trainer.env", "hotpeft.trainer.retention")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = modules()


def imports(tree: ast.Module, *, in_functions: bool) -> list[tuple[int, str]]:
    """(line, module) of every `hotpeft` import, at module level or inside functions."""
    found = []

    def visit(node, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            now = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import) and now == in_functions:
                found.extend((child.lineno, a.name) for a in child.names if a.name.startswith("hotpeft."))
            elif isinstance(child, ast.ImportFrom) and now == in_functions and (child.module or "").startswith("hotpeft"):
                # `from hotpeft.x import y` may import the submodule hotpeft.x.y
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((child.lineno, sub if sub in MODULES else child.module))
            visit(child, now)

    visit(tree, False)
    return found


def package_of(module: str) -> str:
    return next(folder for folder, package in PACKAGES.items() if module == package or module.startswith(package + "."))


def test_the_layout_test_sees_every_room():
    assert {package_of(m) for m in MODULES} == set(PACKAGES)
    assert len(MODULES) > 60


def test_packages_import_only_in_the_architecture_direction():
    wrong = []
    for module, (path, tree) in MODULES.items():
        mine = package_of(module)
        for line, target in imports(tree, in_functions=False) + imports(tree, in_functions=True):
            theirs = package_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            elif mine == "server" and theirs == "trainer" and not target.startswith(SERVER_MAY_USE_FROM_TRAINER):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (the server uses the trainer only for "
                             "the jobs API)")
    assert not wrong, "\n".join(wrong)


def test_no_hotpeft_import_is_hidden_in_a_function_outside_the_cli():
    """The CLI imports a subcommand's modules when it runs, so that every command starts fast; each
    such import says why. Anywhere else an import inside a function would only hide a cycle."""
    wrong = []
    for module, (path, tree) in MODULES.items():
        lines = path.read_text().splitlines()
        for line, target in imports(tree, in_functions=True):
            if package_of(module) != "cli":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
            elif "#" not in lines[line - 1]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: a deferred import needs a comment saying why")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_through_a_cycle():
    graph = defaultdict(set)
    for module, (_, tree) in MODULES.items():
        for _, target in imports(tree, in_functions=False):
            # a package's __init__ runs first whenever one of its modules is imported
            graph[module].add(target)
            parent = target.rpartition(".")[0]
            while parent.count(".") >= 1:
                if parent in MODULES and parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
                parent = parent.rpartition(".")[0]
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, stack + [node])
        state[node] = "done"

    for module in sorted(MODULES):
        if module not in state:
            walk(module, [])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_rooms_stay_readable(module):
    path, tree = MODULES[module]
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: split it by job"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)}"


def test_the_tests_can_fail():
    """The checks above find what they look for: a cycle and a forbidden import, made up here."""
    fake = ast.parse("from hotpeft.server.app import create_app\n")
    assert imports(fake, in_functions=False) == [(1, "hotpeft.server.app")]
    hidden = ast.parse("def f():\n    from hotpeft.model import source\n")
    assert imports(hidden, in_functions=True) == [(2, "hotpeft.model.source")]
    assert package_of("hotpeft.server.app") not in ALLOWED["adapters"]
