"""The built wheel carries the twistd dropin, and the docs' example runs."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def test_wheel_contains_dropin_and_twistd_finds_it(tmp_path):
    """Build the wheel, install it into a fresh venv, ask twistd for the plugin."""
    if not (ROOT / "setup.cfg").exists():  # pragma: no cover - running from a wheel
        import pytest

        pytest.skip("needs the source tree")
    dist = tmp_path / "dist"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                str(dist), str(ROOT))
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("swarmcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/swarmcache_plugin.py" in names
    # An __init__.py here would shadow Twisted's own twisted package.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    installed = run(str(bin_dir / "pip"), "install", "-q", str(wheel))
    assert installed.returncode == 0, installed.stderr
    helped = run(str(bin_dir / "twistd"), "swarmcache", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--peer" in helped.stdout and "--max-memory" in helped.stdout


def test_embedding_example_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = run(sys.executable, str(ROOT / "docs" / "examples" / "embed.py"), env=env)
    assert result.returncode == 0, result.stderr
    assert "in-process get: hello" in result.stdout
    assert "counter: 1 2" in result.stdout
    assert "client get: hello" in result.stdout
    assert "keys on the node: 2" in result.stdout


def test_editable_install_in_compat_mode_keeps_twistd_finding_the_plugin(tmp_path):
    """``pip install -e . --config-settings editable_mode=compat`` (the README's setting):
    the source tree goes on sys.path, where Twisted looks for ``twisted/plugins``; the
    default editable mode maps the packages through an import hook Twisted's plugin
    search does not see."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    # The dependencies come from the venv running the tests, not from the network.
    (site,) = (env_dir / "lib").glob("python*/site-packages")
    here = next(p for p in sys.path if p.endswith("site-packages") and "twisted" in os.listdir(p))
    (site / "deps.pth").write_text(here + "\n")
    installed = run(str(bin_dir / "pip"), "install", "-q", "--no-deps", "-e", str(ROOT),
                    "--config-settings", "editable_mode=compat")
    assert installed.returncode == 0, installed.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = run(str(bin_dir / "python"), "-c",
                 "import sys; from twisted.scripts.twistd import run; "
                 "sys.argv = ['twistd', 'swarmcache', '--help']; run()",
                 cwd=tmp_path, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "--peer" in helped.stdout
