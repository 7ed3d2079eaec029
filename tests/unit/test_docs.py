"""The documentation holds together: every relative link in README.md and deploy/docs/*.md reaches a
file (and a heading, when it names one), user-facing texts (named-query descriptions, ``--help``)
speak of what a user can see rather than of internal issue or migration numbers, each stage's
``--help`` names its section of the settings reference, the compression the docs state is the
code's default, and the command the demo prints runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowtally import cli
from flowtally.dev import demo
from sql import queries
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "deploy" / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

#: A markdown link or image: [text](target) / ![alt](target).
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
#: An internal work-item number in a user-facing text: "issue 6", "migration 0007", "issue #4".
_INTERNAL_NUMBER = re.compile(r"\b(issue|migration)s?\s+#?\d+", re.I)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (word characters, spaces
    and hyphens kept), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (a repeated heading's are numbered, as GitHub does)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    """The targets of the links in ``page``, outside code."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", page.read_text()))
    return _LINK.findall(text)


def test_slug_as_github_makes_it() -> None:
    assert slug("flowtally sink, flowtally migrate, flowtally query") == \
        "flowtally-sink-flowtally-migrate-flowtally-query"
    assert slug("docker-compose (one machine)") == "docker-compose-one-machine"
    assert slug("`/metrics`, `/healthz`, `/livez`") == "metrics-healthz-livez"


def test_the_pages_are_there() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "configuration.md", "named-queries.md", "sensor-netflow.md", "sensor-conntrack.md", "enricher.md",
            "watcher.md", "sink.md", "queries.md", "health.md", "deploy.md", "dashboards.md",
            "development.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = page if not path else (page.parent / path).resolve()
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, broken


#: Top-level folders of the repository: a code span starting with one of them names a file or folder.
_TREES = ("flowtally/", "sensors/", "enricher/", "sink/", "sql/", "deploy/", "tests/")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_source_paths_exist(page: Path) -> None:
    """A path in code, e.g. `enricher/times.py` or `sql/migrations/NNNN_*.sql`, names something that
    is there (so a module that moves takes its mentions along)."""
    spans = re.findall(r"`([^`]+)`", _FENCE.sub("", page.read_text()))
    named = {s for s in spans if s.startswith(_TREES) and re.fullmatch(r"[\w./*-]+", s)}
    missing = [p for p in sorted(named) if not list(ROOT.glob(p.replace("NNNN", "[0-9]" * 4).rstrip("/")))]
    assert not missing, missing


def test_readme_links_every_page() -> None:
    """The README is the front page: every page under deploy/docs is one link away."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert set(DOCS.glob("*.md")) <= linked
    assert sum(len(links(p)) for p in PAGES) > 50  # the link pattern finds them


def test_readme_keeps_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash deploy/local/demo.sh     # 1." in readme
    assert "bash deploy/local/test.sh     # 2." in readme
    assert (ROOT / "deploy" / "local" / "test.sh").is_file()
    # command 1 installs the venv and runs the demo from it: the command the demo prints uses it
    assert "exec .venv/bin/flowtally demo" in (ROOT / "deploy" / "local" / "demo.sh").read_text()


@pytest.mark.parametrize("name", queries.names())
def test_query_descriptions_name_no_internal_numbers(name: str) -> None:
    description = queries.load(name).description
    assert description
    assert not _INTERNAL_NUMBER.search(description), description


def test_committed_query_reference_is_what_the_generator_writes() -> None:
    gen = load_script(DOCS / "generate_query_reference.py")
    assert (DOCS / "named-queries.md").read_text() == gen.render(), \
        "stale: run python deploy/docs/generate_query_reference.py"
    assert gen.main(["--check"]) == 0
    for name in queries.names():  # the page's parameters are the ones `flowtally query` fills in
        assert {p: d for p, _t, d, _n in gen.parameters(name)} == queries.load(name).defaults, name
    assert ("minutes", "UInt32", "60", "0 = all time") in gen.parameters("top_talkers")


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*path, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_texts_name_no_internal_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    paths = {(), ("sensor",), ("generate",), ("kafka",)} | set(cli._TARGETS)
    for path in sorted(paths):
        text = _help(path, capsys)
        assert "usage: flowtally" in text
        assert not _INTERNAL_NUMBER.search(text), (path, text)


@pytest.mark.parametrize("path", sorted(cli.STAGE_DOCS), ids=" ".join)
def test_stage_help_points_to_its_settings(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    anchor, page = cli.STAGE_DOCS[path]
    text = _help(path, capsys)
    assert f"  {cli.CONFIGURATION_DOC}#{anchor}\n" in text  # on a line of its own, unbroken
    assert "FLOWTALLY_KAFKA_BOOTSTRAP" in text
    assert f"more about this command: {page}\n" in text
    assert anchor in anchors(ROOT / cli.CONFIGURATION_DOC)
    assert (ROOT / page).is_file()


def test_every_stage_of_the_reference_has_a_help_pointer() -> None:
    """A stage added to the settings reference gets its --help pointer too."""
    stages = {a for a in anchors(ROOT / cli.CONFIGURATION_DOC) if a.startswith("flowtally-")}
    assert stages == {anchor for anchor, _ in cli.STAGE_DOCS.values()}


def test_the_documented_compression_is_the_default() -> None:
    """development.md and the stage pages say flow batches are lz4 by default and the other
    messages zstd: the settings' and the wire format's defaults."""
    from enricher.settings import EnricherSettings
    from flowtally.wire import WRITE_OPTIONS
    from sensors.conntrack.settings import ConntrackSettings
    from sensors.netflow.collector import NetflowSettings

    for model in (NetflowSettings, ConntrackSettings, EnricherSettings):
        assert model.model_fields["compression"].default == "lz4", model
    assert WRITE_OPTIONS.compression == "zstd"
    text = (DOCS / "development.md").read_text()
    assert "Flow batches are lz4-compressed by default" in text
    assert "completeness batches and\ndead-letter messages are zstd-compressed" in text
    assert "zstd-compressed buffers" not in (ROOT / "README.md").read_text()


def test_the_command_the_demo_prints_runs(tmp_path: Path) -> None:
    command = demo.flowtally_command(ROOT)
    assert command == ".venv/bin/flowtally" or Path(command).is_absolute() or " -m " in command
    out = subprocess.run(f"{command} --version", shell=True, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("flowtally ")
    # from elsewhere, the same script by its absolute path
    elsewhere = demo.flowtally_command(tmp_path)
    assert not elsewhere.startswith(".venv")
    out = subprocess.run(f"{elsewhere} --version", shell=True, cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("flowtally ")


def test_the_demo_command_without_a_console_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An interpreter with no flowtally script beside it: the module through that interpreter."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    assert demo.flowtally_command(tmp_path) == f"{tmp_path / 'python3'} -m flowtally.cli"
