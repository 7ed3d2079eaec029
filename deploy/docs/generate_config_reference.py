"""Generate deploy/docs/configuration.md and flowtally/env_names.py from the stages' settings models.

    python deploy/docs/generate_config_reference.py           # rewrite the file
    python deploy/docs/generate_config_reference.py --check   # exit 1 if the committed file differs

The models are found, not listed: every ``StageSettings`` subclass defined in a ``settings.py``
module of the stage packages (plus the NetFlow sensor's, which lives next to its collector), so a
new stage's model shows up on the next run and tests/unit/test_config_reference.py fails until
the file is regenerated. Groups shared by several stages (kafka, topics, clickhouse) are described
once. Each setting: its dotted name, the environment variable, the type with its bounds, the
default and the model's own description.

flowtally/env_names.py is the set of every stage's environment variables, with which each stage
tells a misspelt ``FLOWTALLY_…`` variable (an error) from another stage's (ignored), without
importing the other stages.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from flowtally.settings import ENV_PREFIX, Group, StageSettings, env_names  # noqa: E402

OUT = Path(__file__).resolve().parent / "configuration.md"
ENV_OUT = ROOT / "flowtally" / "env_names.py"
PACKAGES = ("flowtally", "sensors", "enricher", "sink", "sql")
#: Settings models that do not live in a settings.py module.
EXTRA_MODULES = ("sensors.netflow.collector",)
#: The commands that read each module's model (a model found elsewhere is named by its module).
COMMANDS = {
    "sensors.netflow.collector": "flowtally sensor netflow",
    "sensors.conntrack.settings": "flowtally sensor conntrack",
    "enricher.settings": "flowtally enrich",
    "enricher.k8s.settings": "flowtally watch-k8s",
    "sink.settings": "flowtally sink, flowtally migrate, flowtally query",
}


def settings_modules() -> list[str]:
    """Dotted names of every settings.py module under the stage packages, plus EXTRA_MODULES."""
    found = set(EXTRA_MODULES)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("settings.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            found.add(".".join(rel.parts))
    return sorted(found)


def stage_models() -> list[type[StageSettings]]:
    """Every StageSettings subclass defined in the settings modules, ordered by command."""
    models: list[type[StageSettings]] = []
    for name in settings_modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, StageSettings) and obj is not StageSettings and obj.__module__ == name:
                models.append(obj)
    return sorted(models, key=lambda m: (command_of(m), m.__name__))


def command_of(model: type[BaseModel]) -> str:
    return COMMANDS.get(model.__module__, model.__module__)


# --- Rendering ------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" (optional)" if type(None) in args else "")
    if origin in (list, tuple, set):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"list of {inner} (comma-separated in the environment)"
    if annotation is SecretStr:
        return "secret string"
    if annotation is Path:
        return "path"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                           ("max_length", "length ≤")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        factory = info.default_factory
        if factory in (list, tuple, set):
            return "empty"
        doc = inspect.getdoc(factory)
        return f"computed ({doc.splitlines()[0].rstrip('.')})" if doc else "computed"
    value = info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, BaseModel):
        return "(group)"
    return f"`{value}`"


def _cell(text: str) -> str:
    """One Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _is_group(info: FieldInfo) -> bool:
    return isinstance(info.annotation, type) and issubclass(info.annotation, Group)


def field_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One table row per (non-group) field of ``model``; ``prefix`` is the group name, if any."""
    rows = []
    for name, info in model.model_fields.items():
        if _is_group(info):
            continue
        dotted = f"{prefix}.{name}" if prefix else name
        env = ENV_PREFIX + dotted.replace(".", "_").upper()
        kind = _type_name(info.annotation)
        bounds = _bounds(info)
        if bounds:
            kind = f"{kind}, {bounds}"
        rows.append(f"| `{dotted}` | `{env}` | {_cell(kind)} | {_cell(_default(info))} | "
                    f"{_cell(info.description or '')} |")
    return rows


HEADER = "| setting | environment variable | type | default | description |\n| --- | --- | --- | --- | --- |"


def groups_of(model: type[StageSettings]) -> dict[str, type[Group]]:
    """The nested groups of a stage model, by field name."""
    return {name: typing.cast(type[Group], info.annotation)
            for name, info in model.model_fields.items() if _is_group(info)}


def render() -> str:
    """The Markdown text of the reference."""
    models = stage_models()
    shared: dict[str, type[Group]] = {}
    for model in models:
        for name, group in groups_of(model).items():
            if shared.setdefault(name, group) is not group:
                raise ValueError(f"group {name} is {shared[name].__name__} in one stage, "
                                 f"{group.__name__} in another")
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by deploy/docs/generate_config_reference.py from the settings models; "
        "do not edit. -->",
        "",
        "Every stage reads one typed settings model: command-line flags first, then environment "
        f"variables `{ENV_PREFIX}…`, then an optional YAML file (`--config` or `{ENV_PREFIX}CONFIG`; keys "
        "as in the *setting* column, groups as nested mappings), then the defaults below. Unknown "
        "settings and bad values stop the stage with exit code 2 and a message naming the setting "
        "and its variable. A group's settings take one underscore after the group name: "
        f"`kafka.bootstrap` is `{ENV_PREFIX}KAFKA_BOOTSTRAP`.",
        "",
        "| command | model | groups |",
        "| --- | --- | --- |",
    ]
    for model in models:
        groups = ", ".join(f"[{g}](#{g})" for g in groups_of(model)) or "none"
        out.append(f"| `{command_of(model)}` | `{model.__module__}.{model.__name__}` | {groups} |")
    out += ["", "## Stages", ""]
    for model in models:
        out += [f"### {command_of(model)}", "", _cell(inspect.getdoc(model) or ""), ""]
        used = groups_of(model)
        if used:
            out += ["Groups: " + ", ".join(f"[{g}](#{g})" for g in used) + ".", ""]
        out += [HEADER, *field_rows(model), ""]
    out += ["## Groups", "", "Shared by the stages that list them; the same variables configure each.", ""]
    for name in sorted(shared):
        group = shared[name]
        users = ", ".join(f"`{command_of(m)}`" for m in models if name in groups_of(m))
        where = f"`{group.__module__}.{group.__name__}`"
        out += [f"### {name}", "", f"{_cell(inspect.getdoc(group) or '')} ({where}; used by {users})", "",
                HEADER, *field_rows(group, name), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def render_env_names() -> str:
    """The Python text of flowtally/env_names.py."""
    names = sorted(set().union(*(env_names(model) for model in stage_models())))
    body = "".join(f'    "{name}",\n' for name in names)
    return (
        '"""Every environment variable a stage model reads (generated by '
        'deploy/docs/generate_config_reference.py\nfrom the settings models; do not edit)."""\n\n'
        f"STAGE_ENV_NAMES: frozenset[str] = frozenset({{\n{body}}})\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    outputs = {OUT: render(), ENV_OUT: render_env_names()}
    if args.check:
        stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}; run python deploy/docs/generate_config_reference.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
