"""Example YAML configs shipped with tfreg (data specs under ``data/``); each method's default
YAML ships beside its plugin code."""

from importlib import resources
from pathlib import Path


def config_path(name: str) -> Path:
    """Path of a shipped config file, e.g. ``config_path("data/oasis.yaml")``."""
    return Path(str(resources.files(__name__) / name))
