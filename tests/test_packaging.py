"""Packaging: every Python package folder is declared in setup.cfg under its installed name, so a
non-editable install (`pip install .`) ships the whole project."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_NAME = {"tfreg": "tfreg", "plugins": "tfreg_plugins", "cli": "tfreg_cli",
                  "configs": "tfreg_configs"}


def declared_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}


def test_every_package_folder_is_declared():
    found = set()
    for folder, name in INSTALLED_NAME.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    missing = found - declared_packages()
    assert not missing, f"packages missing from setup.cfg [options] packages: {sorted(missing)}"


def test_no_top_level_generic_names_are_installed():
    # `plugins` and `cli` are generic names: they must only be installed under the tfreg_ prefix.
    assert not {"plugins", "cli", "configs"} & declared_packages()
