"""The layout's rules, read from the source (ast) of every module in sbcrt/:

- the torch-free side (sbcrt/runtime, sbcrt/watch, sbcrt/train, sbcrt/service.py, sbcrt/commands/*) never imports
  sbcrt.export, sbcrt.models or torch; only commands/export.py and commands/train.py (for --fine-tune) may, inside
  a function (after parsing, once the user asked for it);
- model code (sbcrt/models) knows nothing of the runtime, the camera loop, the CLI or the export stage;
- library code (everything but sbcrt/commands, sbcrt/cli.py, sbcrt/__main__.py) never imports the CLI and never
  prints: it returns values, raises SbcrtError and logs; the CLI parses and prints. Its errors name no CLI flag
  (`--save-max`): they name the library's settings (errors.SettingError), which the CLI spells as flags.

An import counts wherever it is written (module level, in a function, under TYPE_CHECKING, through
importlib.import_module or __import__ with a literal name), relative imports resolved.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sbcrt"

TORCH_SIDE = ("sbcrt.export", "sbcrt.models", "torch")
CLI = ("sbcrt.cli", "sbcrt.commands")
TORCH_COMMANDS = ("sbcrt.commands.export", "sbcrt.commands.train")  # the workstation commands (export, --fine-tune)


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    lazy: bool  # inside a function


@dataclass(frozen=True)
class Facts:
    imports: list[Import]
    prints: list[int]  # lines that call print()
    flags_raised: list[int]  # lines that raise an error whose text names a command-line flag


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_facts(source: str, module: str, *, is_package: bool = False) -> Facts:
    """The imports and print() calls of one module's source."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    imports: list[Import] = []
    prints: list[int] = []
    flags_raised: list[int] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                imports.extend(Import(alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                imports.append(Import(base, child.lineno, lazy))
                # `from sbcrt import export` imports the submodule sbcrt.export
                imports.extend(Import(f"{base}.{alias.name}", child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.Raise) and child.exc is not None:
                texts = [
                    n.value for n in ast.walk(child.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                ]
                if any(FLAG.search(text) for text in texts):
                    flags_raised.append(child.lineno)
            elif isinstance(child, ast.Call):
                name = _called_name(child.func)
                if name == "print":
                    prints.append(child.lineno)
                elif name in ("importlib.import_module", "import_module", "__import__") and child.args:
                    target = child.args[0]
                    if isinstance(target, ast.Constant) and isinstance(target.value, str):
                        imports.append(Import(target.value, child.lineno, lazy))
                    elif isinstance(target, ast.JoinedStr) and target.values:  # f"sbcrt.commands.{name}"
                        first = target.values[0]
                        if isinstance(first, ast.Constant) and isinstance(first.value, str):
                            imports.append(Import(first.value.rstrip("."), child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return Facts(imports, prints, flags_raised)


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def modules() -> dict[str, tuple[Path, Facts]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        found[name] = (path, read_facts(path.read_text(), name, is_package=path.name == "__init__.py"))
    return found


MODULES = modules()


def where(path: Path, line: int, what: str) -> str:
    return f"{path.relative_to(REPO)}:{line}: {what}"


def violations(rule: str) -> list[str]:
    out = []
    for name, (path, facts) in MODULES.items():
        if rule == "torch-free":
            torch_free = ("sbcrt.runtime", "sbcrt.watch", "sbcrt.train", "sbcrt.commands")
            if not (is_under(name, torch_free) or name == "sbcrt.service"):
                continue
            for imp in facts.imports:
                if is_under(imp.module, TORCH_SIDE) and not (name in TORCH_COMMANDS and imp.lazy):
                    out.append(where(path, imp.line, f"imports {imp.module}"))
        elif rule == "models":
            if not is_under(name, ("sbcrt.models",)):
                continue
            forbidden = ("sbcrt.runtime", "sbcrt.watch", "sbcrt.commands", "sbcrt.export", "sbcrt.cli", "sbcrt.service")
            out += [where(path, i.line, f"imports {i.module}") for i in facts.imports if is_under(i.module, forbidden)]
        elif rule == "library":
            if is_under(name, ("sbcrt.commands",)) or name in ("sbcrt.cli", "sbcrt.__main__"):
                continue
            out += [where(path, i.line, f"imports {i.module}") for i in facts.imports if is_under(i.module, CLI)]
            out += [where(path, line, "calls print()") for line in facts.prints]
            out += [where(path, line, "raises an error naming a CLI flag") for line in facts.flags_raised]
    return out


def test_every_module_is_read() -> None:
    # The rules below are only as good as the list they run over.
    names = set(MODULES)
    assert {"sbcrt", "sbcrt.cli", "sbcrt.runtime.classifier", "sbcrt.watch.loop", "sbcrt.export.pipeline"} <= names
    assert {"sbcrt.models.registry", "sbcrt.commands.export", "sbcrt.service"} <= names
    assert len(names) == len(list(PACKAGE.rglob("*.py")))


def test_the_torch_free_side_never_imports_export_models_or_torch() -> None:
    found = violations("torch-free")
    assert not found, "\n".join(found)


def test_model_code_knows_no_runtime_loop_cli_or_export() -> None:
    found = violations("models")
    assert not found, "\n".join(found)


def test_library_code_never_imports_the_cli_prints_or_names_flags() -> None:
    found = violations("library")
    assert not found, "\n".join(found)


# -- the reader itself: each rule fails on code that breaks it ------------------------------------------------


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("import torch.nn as nn\n", "sbcrt.watch.x", [Import("torch.nn", 1, False)]),
        ("def f():\n    from ..export import pipeline\n", "sbcrt.watch.x", None),
        ("from . import models\n", "sbcrt", None),
        ("import importlib\nimportlib.import_module('sbcrt.models.registry')\n", "sbcrt.runtime.x", None),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n", "sbcrt.runtime.x", None),
    ],
)
def test_the_reader_sees_every_way_of_importing(source: str, module: str, expected: list[Import] | None) -> None:
    facts = read_facts(source, module, is_package=module == "sbcrt")
    if expected is not None:
        assert facts.imports == expected
    assert any(is_under(i.module, TORCH_SIDE) for i in facts.imports), facts.imports


def test_the_reader_sees_prints_and_lazy_imports() -> None:
    facts = read_facts("def run():\n    import sbcrt.export.pipeline\n    print('x')\n", "sbcrt.commands.export")
    assert facts.prints == [3] and facts.imports == [Import("sbcrt.export.pipeline", 2, True)]
    dynamic = read_facts("import importlib\nimportlib.import_module(f'sbcrt.commands.{n}')\n", "sbcrt.service")
    assert any(is_under(i.module, CLI) for i in dynamic.imports)


def test_the_reader_sees_flags_in_raised_errors() -> None:
    facts = read_facts('def f(x):\n    raise UsageError(f"--save-max {x!r}: bad")\n', "sbcrt.watch.sinks")
    assert facts.flags_raised == [2]
    named = read_facts('def f(x):\n    raise SettingError("save_max", "bad", x)\n', "sbcrt.watch.sinks")
    assert named.flags_raised == []


def test_a_setting_error_speaks_the_callers_vocabulary() -> None:
    from sbcrt.commands.arguments import flag_of
    from sbcrt.errors import SettingError

    error = SettingError("stride", "applies to video files; use {fps} instead", cites=["fps"])
    assert str(error) == "stride: applies to video files; use fps instead"
    assert error.describe(flag_of) == "--stride: applies to video files; use --fps instead"
    # What the user typed is quoted as given, braces and all: only declared cites are ever replaced.
    typed = SettingError("when", "the model has no class '{fps}'", "{fps}>=0.5")
    assert typed.describe(flag_of) == "--when '{fps}>=0.5': the model has no class '{fps}'"
    assert flag_of("mqtt.ca_file") == "--mqtt-ca" and flag_of("http.token") == "--http-token"


def settings_named_in_errors() -> set[str]:
    """Every setting a library SettingError names or cites, read from the source."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _called_name(node.func) == "SettingError" and node.args:
                cited = [kw.value for kw in node.keywords if kw.arg == "cites"]
                for constant in [node.args[0], *(e for c in cited if isinstance(c, ast.List) for e in c.elts)]:
                    assert isinstance(constant, ast.Constant), where(path, node.lineno, "a setting name not literal")
                    names.add(constant.value)
    return names


def test_every_setting_an_error_names_is_a_flag_the_cli_has() -> None:
    import argparse

    from sbcrt.cli import build_parser
    from sbcrt.commands.arguments import flag_of

    flags: set[str] = set()
    pending = [build_parser()]
    while pending:
        parser = pending.pop()
        for action in parser._actions:  # argparse keeps no public list of a parser's options
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    named = settings_named_in_errors()
    assert len(named) > 20, named
    missing = sorted(f"{name} -> {flag_of(name)}" for name in named if flag_of(name) not in flags)
    assert not missing, missing
