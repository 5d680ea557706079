"""The package layout: the core imports nothing from the integrations or the tools."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / "tome_fx"
BELOW = ("integrations", "tools")
# the front door names the integrations publicly; `python -m tome_fx.demo` launches the tool
ENTRY_POINTS = {"__init__.py", "demo.py"}


def _imported(path: pathlib.Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_the_core_imports_nothing_from_integrations_or_tools():
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in BELOW
            and str(p.relative_to(PACKAGE)) not in ENTRY_POINTS]
    assert len(core) > 10
    offending = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported(p) if n.split(".")[1:2] and n.split(".")[1] in BELOW)
                 for p in core}
    assert not {k: v for k, v in offending.items() if v}


def test_integrations_import_no_tools():
    for path in (PACKAGE / "integrations").glob("*.py"):
        assert not [n for n in _imported(path) if n.startswith("tome_fx.tools")], path
