"""The package as users install it: a wheel, installed non-editable, run outside the source tree.

The Docker image installs flowtally this way, so whatever ``pyproject.toml`` forgets to ship
(a data file, a subpackage) works in the editable checkout the other tests use and fails only
there. This test builds the wheel from the checkout, installs it into a scratch environment whose
only other packages are the dependencies already installed in the test's own environment (its
source-tree hooks are not carried over), migrates a fresh chDB with the installed ``flowtally``
command and runs every named query it lists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Building the wheel (setuptools in an isolated build environment) and installing it.
BUILD_TIMEOUT_S = 300


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
        f"stderr:\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` directory of a scratch environment with the wheel installed non-editable."""
    root = tmp_path_factory.mktemp("installed")
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(REPO)],
         cwd=root, timeout=BUILD_TIMEOUT_S)
    [wheel] = wheels.glob("flowtally-*.whl")
    env_dir = root / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=root).stdout.strip())
    # The dependencies from this environment: a plain path line, so the site-packages' own .pth
    # files (the editable install's finder among them) are not processed.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # Without PYTHONPATH: a checkout on it (a worktree's) would make pip see flowtally as installed
    # already (its egg-info) and install nothing.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
          str(wheel)], cwd=root, env=clean, timeout=BUILD_TIMEOUT_S)
    return bin_dir


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLOWTALLY_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FLOWTALLY_CLICKHOUSE_PATH"] = str(tmp_path / "chdb")
    return env


def test_installed_package_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    """The scratch environment imports every package from the wheel, none from the source tree."""
    out = _run([str(installed / "python"), "-c",
                "import flowtally, sensors, enricher, sink, sql; "
                "print('\\n'.join(m.__file__ for m in (flowtally, sensors, enricher, sink, sql)))"],
               cwd=tmp_path, env=_env(tmp_path)).stdout.split()
    assert len(out) == 5
    for path in out:
        assert str(installed.parent) in path and str(REPO) not in path, path


def test_installed_package_migrates_and_runs_every_named_query(installed: Path, tmp_path: Path) -> None:
    """``flowtally migrate`` then ``flowtally query NAME`` for every query the command lists."""
    flowtally = str(installed / "flowtally")
    env = _env(tmp_path)
    _run([flowtally, "migrate"], cwd=tmp_path, env=env)
    listing = _run([flowtally, "query"], cwd=tmp_path, env=env).stdout
    names = [line.split("\t", 1)[0] for line in listing.splitlines() if line.strip()]
    known = sorted(p.stem for p in (REPO / "sql" / "queries").glob("*.sql"))
    assert names == known
    for name in names:
        result = _run([flowtally, "query", name, "--format", "json"], cwd=tmp_path, env=env)
        assert "placeholder" not in result.stderr, (name, result.stderr)
