"""Default YAML configs shipped with tfreg (method defaults and dataset examples)."""

from importlib import resources
from pathlib import Path


def config_path(name: str) -> Path:
    """Path of a shipped config file, e.g. ``config_path("voxelmorph.yaml")``."""
    return Path(str(resources.files(__name__) / name))
