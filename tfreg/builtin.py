"""The model that ships inside the package: ``--model builtin`` and ``--init builtin``.

A small contrast-agnostic registration network trained on images synthesised from label maps
(``configs/data/synthseg-half.yaml``; recipe and learning curve in docs/builtin-model.md). It is
an ordinary exported model folder (`tfreg.export`) stored at ``tfreg/models/builtin/model`` with
a manifest beside it::

    tfreg/models/builtin/manifest.json   {"name", "version", "files": {relative path: sha256}}
    tfreg/models/builtin/model/          the exported model (tfreg_model.json, saved_model/, ...)

Every file is checked against its SHA-256 before the model is used (once per process), so a
damaged or edited installation is refused with one line instead of registering with wrong
weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from tfreg.errors import InputError

__all__ = ["NAME", "ROOT", "MANIFEST", "model_dir", "version", "notice", "verify", "file_digests",
           "resolve", "refine_steps", "pack"]

#: the value of ``--model`` / ``--init`` that selects the shipped model.
NAME = "builtin"
#: where the shipped model lives inside the installed package.
ROOT = Path(__file__).resolve().parent / "models" / "builtin"
#: its manifest (version and SHA-256 of every file of the model folder).
MANIFEST = "manifest.json"


def model_dir(root: str | Path | None = None) -> Path:
    """The exported model folder of the shipped model (not checked; see `verify`)."""
    return Path(ROOT if root is None else root) / "model"


def _manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: the builtin model is not installed (no manifest); "
                         "reinstall tfreg") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable builtin-model manifest ({err}); reinstall tfreg") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) \
            or not data["files"] or "version" not in data:
        raise InputError(f"{path}: not a builtin-model manifest (needs 'version' and 'files'); "
                         "reinstall tfreg")
    return data


def version(root: str | Path | None = None) -> str:
    """The shipped model's version string (from its manifest)."""
    return str(_manifest(Path(ROOT if root is None else root))["version"])


def notice(root: str | Path | None = None) -> str | None:
    """The manifest's one-line ``notice`` about the shipped model's state (None when it has
    none): `tfreg register` prints it whenever the model is used."""
    text = _manifest(Path(ROOT if root is None else root)).get("notice")
    return f"note: builtin model {version(root)}: {text}" if text else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, keyed by its POSIX path relative to `folder`
    (what the manifest records; used when the model is (re)packaged)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def verify(root: str | Path | None = None) -> Path:
    """Check every file of the shipped model against the manifest; return the model folder.

    Args:
        root: the folder holding ``manifest.json`` and ``model/`` (default `ROOT`).

    Raises:
        InputError: one line naming the first missing or changed file (and the version).
    """
    root = Path(ROOT if root is None else root).resolve()
    return _verify(str(root), _stamp(root))


def _stamp(root: Path) -> tuple:
    """Sizes and modification times of the model's files: a changed file is checked again."""
    folder = model_dir(root)
    try:
        return tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in sorted(folder.rglob("*")) if p.is_file())
    except OSError:
        return ()


@functools.lru_cache(maxsize=4)
def _verify(root: str, stamp: tuple) -> Path:
    manifest = _manifest(Path(root))
    folder = model_dir(Path(root))
    tag = f"builtin model {manifest['version']}"
    for rel, expected in sorted(manifest["files"].items()):
        path = folder / rel
        if not path.is_file():
            raise InputError(f"{path}: missing file of the {tag}; reinstall tfreg")
        if _sha256(path) != expected:
            raise InputError(f"{path}: SHA-256 does not match the {tag} manifest (damaged or "
                             "modified file); reinstall tfreg")
    return folder


def resolve(value: str | Path | None) -> str | Path | None:
    """``"builtin"`` → the verified folder of the shipped model; anything else unchanged."""
    if value is not None and str(value) == NAME:
        return verify()
    return value


def refine_steps(cfg) -> int:
    """Instance-optimisation steps after the network for ``--init builtin``: the finest level's
    steps of `cfg` (an `InstanceConfig`; ``--iterations`` changes them), 0 without levels."""
    levels = getattr(cfg, "levels", ())
    return int(cfg.iterations[-1]) if levels else 0


def pack(run_dir: str | Path, model_version: str, *, root: str | Path | None = None,
         checkpoint: str | None = None, preprocessing: dict | None = None,
         extra_info: dict | None = None) -> Path:
    """Export a training run as the shipped model and write its manifest (maintainers only).

    Args:
        run_dir: the training run (``tfreg train`` output folder).
        model_version: the version string recorded in the manifest and ``tfreg_model.json``.
        root: destination (default `ROOT`); ``root/model`` is replaced.
        checkpoint: export this checkpoint prefix instead of the final weights.
        preprocessing: replaces the run's inference preprocessing record (e.g. to add the
            voxel size the training grid had, so that images of any spacing are resampled).
        extra_info: more entries for ``tfreg_model.json`` (recipe, validation Dice...).

    Returns:
        The model folder.
    """
    from tfreg.export import export
    from tfreg.io import atomic_path

    root = Path(ROOT if root is None else root)
    root.mkdir(parents=True, exist_ok=True)
    folder = export(run_dir, model_dir(root), checkpoint=checkpoint,
                    extra_info={"builtin_version": model_version, **(extra_info or {})})
    if preprocessing is not None:
        from tfreg.data import Preprocessing
        from tfreg.export import MODEL_INFO

        info = json.loads((folder / MODEL_INFO).read_text(encoding="utf-8"))
        info["preprocessing"] = Preprocessing.from_dict(preprocessing).to_dict()
        with atomic_path(folder / MODEL_INFO) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    manifest = {"name": NAME, "version": model_version, "files": file_digests(folder)}
    with atomic_path(root / MANIFEST) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folder
