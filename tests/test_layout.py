"""The package's layering, checked on the import statements of every module (ast, no imports run).

Layers, bottom up: config, storage and options (the base); method/ (pure torch); model/ and
data/ (Ray-free stages); distributed/ (the only Ray code); commands/ (one module per
subcommand); cli. docs/architecture.md explains them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The modules ``path`` imports anywhere in its code (also inside functions), absolute or
    relative, including those imported only for type checking."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pipeline import x`
    return found


MODULES = {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """``pipeline.method.engine`` -> ``method``; ``pipeline.config`` -> ``config``."""
    return module.split(".")[1] if module.count(".") else ""


def own(imported: set[str]) -> set[str]:
    """The modules of this package among ``imported`` (only those that exist)."""
    return {name for name in imported if name in MODULES}


def test_the_walk_sees_every_module_and_their_imports():
    assert {"pipeline.method.engine", "pipeline.distributed.plan", "pipeline.commands.query",
            "pipeline.data.output", "pipeline.cli"} <= set(MODULES)
    assert "pipeline.method.boxes" in own(MODULES["pipeline.method.engine"])
    assert "ray" in MODULES["pipeline.distributed.plan"]


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) == "method"])
def test_method_imports_nothing_above_it(module):
    """method/ is pure torch: it may use config and itself, and neither Ray nor open_clip."""
    allowed = {"config", "method"}
    assert {name for name in own(MODULES[module]) if layer(name) not in allowed} == set()
    assert not {name for name in MODULES[module] if name.split(".")[0] in ("ray", "open_clip")}


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) not in ("distributed", "commands")])
def test_only_distributed_and_commands_import_ray(module):
    assert not {name for name in MODULES[module] if name == "ray" or name.startswith("ray.")}


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) == "commands"])
def test_commands_do_not_import_each_other(module):
    others = {name for name in own(MODULES[module]) if layer(name) == "commands"
              and name not in (module, "pipeline.commands")}
    assert others == set()


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) in ("model", "data")])
def test_stages_import_neither_distributed_nor_commands(module):
    assert {name for name in own(MODULES[module]) if layer(name) in ("distributed", "commands", "cli")} == set()


@pytest.mark.parametrize("module", ["pipeline.config", "pipeline.storage", "pipeline.options"])
def test_the_base_imports_no_layer_above_it(module):
    allowed = {"config", "storage", "options"}
    assert {name for name in own(MODULES[module]) if layer(name) not in allowed} == set()
