"""deploy/grafana/render_images.py: the dashboard layout pictures are drawn from the generated JSON
(every panel, where the grid puts it) by graphviz, and the committed PNGs are there for the README."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


images = load_script(GRAFANA / "render_images.py")
DASHBOARDS = sorted(p.stem for p in (GRAFANA / "dashboards").glob("*.json"))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize("name", DASHBOARDS)
def test_layout_shows_every_panel_where_the_grid_puts_it(name: str, tmp_path: Path) -> None:
    board = json.loads((GRAFANA / "dashboards" / f"{name}.json").read_text())
    dot = images.layout_dot(board)
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        assert f"<b>{images._html(p['title'])}</b>" in dot and p["type"] in dot
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert images.tables_read(p), p["title"]
    assert len(re.findall(r"^  p\d+ \[", dot, re.MULTILINE)) == len(board["panels"])
    out = tmp_path / "layout.png"
    images.render_png(dot, out, engine="neato")
    width, height = _png_size(out)
    assert 600 < width < 2000 and 300 < height < 4000, (width, height)


def test_committed_pictures_exist() -> None:
    """One layout per dashboard and the demo service map, at a size a README can show."""
    expected = {f"layout-{n}.png" for n in DASHBOARDS} | {"service-map-demo.png"}
    assert {p.name for p in (GRAFANA / "images").glob("*.png")} == expected
    for name in expected:
        width, height = _png_size(GRAFANA / "images" / name)
        assert 600 < width < 4000 and 300 < height < 4000, (name, width, height)
