"""Layers that point one way: every module of megasae imports only from its own layer or the layers below
(README, "How the code is laid out"). Read from the source with ast, so a violation is named however
deeply it sits."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "megasae"

# Bottom to top. A module's layer is that of the longest name here that prefixes it.
LAYERS = [
    ["megasae.errors", "megasae.checks", "megasae.files", "megasae.dtypes", "megasae.token_policy",
     "megasae._C"],
    ["megasae.data"],
    ["megasae.ops"],
    ["megasae.collectives"],
    ["megasae.sae"],
    # The tuner and the files it reads and writes: formats builds TopKSaeConfigs, from_pretrained reads
    # any format.
    ["megasae.peft", "megasae.formats", "megasae"],
    ["megasae.models", "megasae.parallel"],
    ["megasae.train", "megasae.eval", "megasae.plan"],
    ["megasae.cli", "megasae.bench", "megasae.__main__"],
]


def layer_of(module: str) -> int:
    best = max((name for names in LAYERS for name in names
                if module == name or module.startswith(name + ".")), key=len)
    return next(i for i, names in enumerate(LAYERS) if best in names)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every megasae import in `tree`, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("megasae")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("megasae"):
                # `from megasae import sae` imports the subpackage megasae.sae.
                found += [(node.lineno, f"{base}.{alias.name}" if base == "megasae" else base)
                          for alias in node.names]
    return found


def test_every_import_points_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text())
        for line, target in imported(tree, module, path.name == "__init__.py"):
            if layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import():
    tree = ast.parse("from megasae.train import Trainer\nfrom megasae import sae\n")
    targets = [target for _, target in imported(tree, "megasae.peft.layer", False)]
    assert targets == ["megasae.train", "megasae.sae"]
    assert layer_of("megasae.train") > layer_of("megasae.peft.layer") > layer_of("megasae.sae.functional")
