"""The development tools (flowtally/dev: local Kafka, local stack, demo, generator) stay out of the
product: no stage module imports them, and the CLI imports them only for their own commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("flowtally", "sensors", "enricher", "sink", "sql")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_imports_a_development_tool() -> None:
    offenders = []
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("flowtally", "dev") or rel == Path("flowtally/cli.py"):
                continue
            used = {name for name in _imports(path) if name == "flowtally.dev" or name.startswith("flowtally.dev.")}
            if used:
                offenders.append(f"{rel}: {sorted(used)}")
    assert not offenders, offenders


def test_the_cli_imports_the_generator_only_for_generate() -> None:
    probe = ("import sys; from flowtally import cli; cli.build_parser(with_generator=False); "
             "print(sorted(m for m in sys.modules if m.startswith('flowtally.dev')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    shown = subprocess.run([sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--help"],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    assert "--rate" in shown.stdout
