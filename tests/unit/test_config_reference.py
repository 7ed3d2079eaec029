"""deploy/docs/configuration.md is what the generator writes from the settings models, documents every
stage model and every field, and each environment variable it names really sets that field."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flowtally.settings import Group, StageSettings, load_settings
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "deploy" / "docs" / "configuration.md"


gen = load_script(ROOT / "deploy" / "docs" / "generate_config_reference.py")
MODELS: list[type[StageSettings]] = gen.stage_models()


def _documented_rows() -> dict[str, str]:
    """setting -> environment variable, read back from the committed Markdown tables."""
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \| `(FLOWTALLY_[A-Z0-9_]+)` \|", DOC.read_text(), re.MULTILINE)
    return dict(rows)


def test_committed_reference_is_what_the_generator_writes() -> None:
    assert DOC.read_text() == gen.render(), "stale: run python deploy/docs/generate_config_reference.py"
    assert gen.main(["--check"]) == 0


def test_every_stage_model_is_found() -> None:
    """The known stages at least; new settings.py models are picked up without listing them."""
    names = {m.__name__ for m in MODELS}
    assert {"NetflowSettings", "EnricherSettings", "SinkSettings"} <= names
    for path in ROOT.glob("*/**/settings.py"):
        if ".venv" in path.parts:
            continue
        text = path.read_text()
        for declared in re.findall(r"^class (\w+)\(StageSettings\)", text, re.MULTILINE):
            assert declared in names, f"{declared} in {path} is not in the reference"


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], str]]:
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, Group):
            out += _fields(info.annotation, name)
        else:
            out.append((f"{prefix}.{name}" if prefix else name, model, name))
    return out


def _other_value(info: Any) -> str | None:
    """A valid value other than the default, for numbers and booleans (None: skip the field)."""
    default = info.default
    bounds = {a: getattr(m, a) for m in info.metadata for a in ("ge", "gt", "le", "lt") if getattr(m, a, None)
              is not None}
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, int | float) and typing.get_origin(info.annotation) is None:
        up = default + 1
        if ("le" in bounds and up > bounds["le"]) or ("lt" in bounds and up >= bounds["lt"]):
            up = default - 1
            if ("ge" in bounds and up < bounds["ge"]) or ("gt" in bounds and up <= bounds["gt"]):
                return None
        return str(up)
    return None


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_each_documented_variable_sets_its_field(model: type[StageSettings], monkeypatch: pytest.MonkeyPatch) -> None:
    documented = _documented_rows()
    tried = 0
    for dotted, owner, name in _fields(model):
        assert dotted in documented, f"{model.__name__}.{dotted} is not documented"
        info = owner.model_fields[name]
        value = _other_value(info)
        if value is None:
            continue
        monkeypatch.setenv(documented[dotted], value)
        loaded: Any = load_settings(model)
        for part in dotted.split("."):
            loaded = getattr(loaded, part)
        assert str(loaded).lower() == value.lower() or float(loaded) == float(value), (dotted, loaded, value)
        monkeypatch.delenv(documented[dotted])
        tried += 1
    assert tried >= 5, model.__name__
