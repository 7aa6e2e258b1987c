"""The floor plan of sdmprune/: imports run one way (no module reaches, directly or through others, a
module that imports it), the top level stays small (the rooms hold the rest), and every import the
README shows resolves."""
import ast
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sdmprune")
MAX_TOP_LEVEL_MODULES = 16


def module_files():
    """{dotted module name: path} of every Python file of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def imports_of(name, path, modules):
    """The package modules ``name`` imports anywhere in its file (function-level imports included)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # a name imported from a module: the module itself
                t = t.rpartition(".")[0]
            if t and t != name and not (t == "sdmprune" and name.startswith("sdmprune.")):
                found.add(t)
    return found


def test_no_import_circle():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # a package's face (its __init__) only hands names on: importing a submodule runs it first, which
    # is no circle of the code's own
    graph = {n: {t for t in ts if not (modules[t].endswith("__init__.py") and n.startswith(t + "."))}
             for n, ts in graph.items()}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_top_level_stays_small():
    top = [f for f in os.listdir(PACKAGE) if f.endswith(".py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)


def test_every_import_the_readme_shows_resolves():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    checked = 0
    for block in blocks:
        for line in block.splitlines():
            m = re.match(r"\s*from ([\w.]+) import \(?([\w, ]+)", line)
            if m and m.group(1).split(".")[0] == "sdmprune":
                module = importlib.import_module(m.group(1))
                for name in (n.strip() for n in m.group(2).split(",")):
                    if name and not (name in ("torch_pruning",) or name.startswith("tp")):
                        assert hasattr(module, name) or importlib.util.find_spec(f"{m.group(1)}.{name}"), \
                            f"README: from {m.group(1)} import {name}"
                        checked += 1
    assert checked >= 15, checked
