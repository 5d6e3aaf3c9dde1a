"""The project installs as a package: every code folder and data file is in the wheel's lists,
the `vit-lens` command is declared, and assets/ is found through model/resources.py only."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from model import resources
from viz_app import app as app_launcher
from viz_app import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("model", "viz_app")
        for p in (ROOT / top).rglob("__init__.py")
    }
    listed = set(SETUPTOOLS["packages"]) - {resources.PACKAGE}
    assert found == listed


def test_every_asset_file_goes_into_the_wheel():
    assert SETUPTOOLS["package-dir"][resources.PACKAGE] == "assets"
    patterns = SETUPTOOLS["package-data"][resources.PACKAGE]
    assets = ROOT / "assets"
    shipped = {f.relative_to(assets).as_posix() for pat in patterns for f in assets.glob(pat) if f.is_file()}
    tracked = subprocess.run(["git", "ls-files"], cwd=assets, capture_output=True, text=True).stdout.split()
    files = set(tracked) or {f.relative_to(assets).as_posix() for f in assets.rglob("*") if f.is_file()}
    assert "demo/model.safetensors" in files
    assert files - shipped == set()


def test_assets_are_found_and_the_environment_can_point_elsewhere(tmp_path):
    assert (resources.DEMO_DIR / "config.json").is_file()
    assert resources.IMAGENET_CLASSES.is_file() and any(resources.EXAMPLES_DIR.glob("*.jpg"))
    code = "from model import resources; print(resources.ASSETS)"
    env = {**os.environ, resources.ENV_VAR: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path


def test_no_code_computes_the_assets_path_itself():
    offenders = [
        str(p.relative_to(ROOT))
        for top in ("model", "viz_app", "benchmarks", "tests")
        for p in (ROOT / top).rglob("*.py")
        if p.name not in ("resources.py", Path(__file__).name) and '"assets"' in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_tests_do_not_touch_sys_path():
    needle = "sys.path." + "insert"  # split so that this file does not match itself
    assert [p.name for p in (ROOT / "tests").glob("*.py") if needle in p.read_text(encoding="utf-8")] == []


def test_console_command_is_declared_and_lists_every_subcommand(capsys):
    assert PYPROJECT["project"]["scripts"]["vit-lens"] == "viz_app.cli:main"
    try:
        eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        eps = {}
    if "vit-lens" in eps:  # installed (make installs it editable)
        assert eps["vit-lens"] == "viz_app.cli:main"
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("analyze", *cli.DELEGATED):
        assert name in text


def test_delegated_subcommands_reach_their_modules(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo-gallery", "--help"])
    assert "vit-lens demo-gallery" in capsys.readouterr().out
    assert cli.main(["app", "--help"]) == 0
    assert "streamlit" in capsys.readouterr().out


def test_app_launcher_binds_localhost_and_keeps_the_repo_options(tmp_path):
    argv = app_launcher.command(["--server.port", "8765"])
    assert argv[1:5] == ["-m", "streamlit", "run", str(app_launcher.PAGE_SCRIPT)]
    assert "--server.address=127.0.0.1" in argv and "--client.showErrorDetails=none" in argv
    assert argv[-2:] == ["--server.port", "8765"]  # the user's arguments come last and win
    assert app_launcher.server_options(ROOT / ".streamlit" / "config.toml")["server.maxUploadSize"] == 512
    assert app_launcher.server_options(tmp_path / "missing.toml") == app_launcher.SAFE_DEFAULTS
