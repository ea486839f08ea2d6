"""Packaging: every Python package folder is declared in setup.cfg under its installed name, so a
non-editable install (`pip install .`) ships the whole project; plugins and the core keep to their
import rules (docs/architecture.md)."""

from __future__ import annotations

import ast
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


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(module, level)`` of every import statement in a file (level > 0: relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_plugins_import_only_the_core_and_the_core_only_finds_them_through_entry_points():
    """A plugin imports `tfreg` and its own modules, never another plugin; `tfreg` and the CLI
    reach methods through `tfreg.registry`, never by importing `tfreg_plugins`."""
    wrong = []
    for plugin in sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file()):
        for path in plugin.rglob("*.py"):
            for module, level in _imports(path):
                other_plugin = module.startswith("tfreg_plugins") and \
                    module.split(".")[:2] != ["tfreg_plugins", plugin.name]
                if other_plugin or module.split(".")[0] == "plugins" or level > 1:
                    wrong.append(f"{path.relative_to(ROOT)}: {'.' * level}{module}")
    for folder in ("tfreg", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            wrong += [f"{path.relative_to(ROOT)}: {module}" for module, _ in _imports(path)
                      if module.split(".")[0] in ("tfreg_plugins", "plugins")]
    assert not wrong, wrong
