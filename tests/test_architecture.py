"""The package's shape: stages import only earlier stages, modules say their stage, functions stay short,
and the lazy public API in __init__.py matches its TYPE_CHECKING imports. docs/architecture.md explains it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import rslora_tools

PACKAGE = Path(rslora_tools.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

# The data flow, in order. A module may import modules of its own stage or of earlier stages.
STAGES = {
    0: ("errors", "__init__"),
    1: ("sizes", "safetensors_file", "checkpoint", "output", "provenance", "hub_refs", "quant_formats"),
    2: ("scaling", "adapter_config", "adapter", "module_scales", "runtimes", "adapter_writer"),
    3: ("plan", "placement", "ties", "quant_plan", "planner", "config_rewrite", "initial", "stacking", "combination", "extraction_plan",
        "stream_plan"),
    4: ("kernel", "compute", "dequantize", "finite", "task_arithmetic", "factorize"),
    5: ("lowering", "executor"),
    6: ("verification", "merging", "gguf_export", "conversion", "inspection", "card", "hub", "combining", "extraction",
        "hub_transfer", "streaming", "publish"),
    7: ("cli", "__main__"),
}
STAGE_NAMES = {0: "Stage 0", 1: "formats", 2: "adapter and scales", 3: "plan", 4: "compute", 5: "execute",
               6: "commands", 7: "CLI"}
STAGE_OF = {module: stage for stage, modules in STAGES.items() for module in modules}
MAX_LINES = 60  # a function's body, its docstring not counted


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def imports_of(name: str, tree: ast.Module) -> set[str]:
    """Package modules this module imports, at the top or inside functions (`from . import x`, `from .x import y`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names if alias.name in STAGE_OF)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rslora_tools."):
            found.add(node.module.split(".")[1])
    found.discard(name)
    found.discard("_kernel")  # the compiled kernel belongs to kernel.py
    return found


def test_every_module_has_a_stage():
    assert set(modules()) == set(STAGE_OF), "add new modules to STAGES here and to docs/architecture.md"


def test_no_module_imports_a_later_stage():
    later = []
    for name, tree in modules().items():
        for imported in imports_of(name, tree):
            if imported == "__init__" or (name == "__init__"):
                continue  # `from . import __version__`; __init__'s lazy exports reach every stage by design
            if STAGE_OF[imported] > STAGE_OF[name]:
                later.append(f"{name} (stage {STAGE_OF[name]}) imports {imported} (stage {STAGE_OF[imported]})")
    assert later == []


def test_imports_have_no_cycles():
    graph = {name: {m for m in imports_of(name, tree) if m != "__init__"} for name, tree in modules().items()
             if name != "__init__"}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_each_module_docstring_names_its_stage():
    for name, tree in modules().items():
        doc = ast.get_docstring(tree) or ""
        stage = STAGE_OF[name]
        if name == "__main__":
            continue  # two lines that call the CLI
        assert doc.startswith(f"Stage {stage}"), f"{name}.py: the docstring should start with 'Stage {stage}'"
        assert STAGE_NAMES[stage] in doc.splitlines()[0], f"{name}.py: name stage {stage} ({STAGE_NAMES[stage]})"


def test_functions_are_short_or_say_why():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            doc = ast.get_docstring(node) or ""
            if doc:
                body = body[1:]
            if not body:
                continue
            lines = body[-1].end_lineno - body[0].lineno + 1  # type: ignore[operator]
            if lines > MAX_LINES and "Long because" not in doc:
                long.append(f"{name}.{node.name}: {lines} lines")
    assert long == [], "split these, or say in the docstring why they are long ('Long because ...')"


def test_lazy_exports_match_the_type_checking_imports():
    tree = modules()["__init__"]
    exports: dict[str, str] = {}
    checked: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for item in node.body:
                assert isinstance(item, ast.ImportFrom) and item.module is not None
                checked.update({alias.name: item.module for alias in item.names})
    assert exports and exports == checked
    for name, module in exports.items():
        assert getattr(rslora_tools, name) is not None, name


def test_architecture_doc_names_every_module():
    text = ARCHITECTURE.read_text()
    missing = [m for m in STAGE_OF if m not in ("__init__", "__main__") and not re.search(rf"`{m}\.py`", text)]
    assert missing == []


def test_cited_docs_exist_in_the_repository():
    """Code cites the project's own docs (docs/x.md, "Section"), never documents outside the repository."""
    docs = PACKAGE.parent / "docs"
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        assert "shared/docs" not in text and "peft-semantics" not in text, path.name
        for doc, section in re.findall(r'docs/([\w-]+\.md)(?:, "([^"]+)")?', text):
            assert (docs / doc).is_file(), f"{path.name} cites docs/{doc}, which does not exist"
            if section:
                headings = re.findall(r"^#+ (.+)$", (docs / doc).read_text(), flags=re.M)
                assert section in headings, f"{path.name} cites docs/{doc}, section {section!r}, which does not exist"
