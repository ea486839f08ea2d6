"""The check of the model shipped inside the package (`tfreg.builtin`): a manifest of SHA-256 sums
(computed here with hashlib) accepts intact files, and a changed byte, a missing file or a missing
manifest is refused with one line before any work (`tfreg register --model/--init builtin`).
The shipped files themselves and the end-to-end runs: tests/test_builtin_model_run.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from clicheck import one_line_error
from tfreg import builtin
from tfreg.errors import InputError
from tfreg_cli.main import cli


def _run(args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Two 16^3 images (only for the refusal tests: no work may start)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    out = {}
    for name in ("fixed", "moving"):
        out[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)),
                 str(out[name]))
    return out


# ------------------------------------------------------------------------------ the check
@pytest.fixture
def fake_root(tmp_path) -> Path:
    """A model root in the shipped layout whose manifest holds SHA-256 sums computed here."""
    root = tmp_path / "builtin"
    files = {"tfreg_model.json": b"{}", "model.weights.h5": bytes(range(256)) * 8,
             "saved_model/variables/variables.data-00000-of-00001": b"\x01\x02" * 512}
    for rel, data in files.items():
        path = builtin.model_dir(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = {"name": "builtin", "version": "9.9",
                "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}}
    (root / builtin.MANIFEST).write_text(json.dumps(manifest))
    return root


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_accepts_intact_files_and_refuses_a_changed_byte(fake_root):
    assert builtin.verify(fake_root) == builtin.model_dir(fake_root).resolve()
    assert builtin.version(fake_root) == "9.9"
    rel = "saved_model/variables/variables.data-00000-of-00001"
    _flip_a_byte(builtin.model_dir(fake_root) / rel)
    with pytest.raises(InputError) as err:
        builtin.verify(fake_root)
    message = str(err.value)
    assert "\n" not in message
    assert rel in message and "SHA-256 does not match the builtin model 9.9" in message


def test_a_damaged_file_is_refused_with_one_line(fake_root, tiny, monkeypatch):
    rel = "model.weights.h5"
    _flip_a_byte(builtin.model_dir(fake_root) / rel)
    monkeypatch.setattr(builtin, "ROOT", fake_root)
    for flag in ("--model", "--init"):
        out = fake_root.parent / f"out{flag}"
        result = _run(["register", tiny["fixed"], tiny["moving"], flag, "builtin", "-o", out,
                       "-q"])
        one_line_error(result, "SHA-256 does not match", rel, "reinstall")
        assert not out.exists()                     # refused before any work


def test_a_missing_file_or_manifest_is_refused_with_one_line(fake_root, tiny, monkeypatch):
    (builtin.model_dir(fake_root) / "model.weights.h5").unlink()
    monkeypatch.setattr(builtin, "ROOT", fake_root)
    result = _run(["register", tiny["fixed"], tiny["moving"], "--model", "builtin", "-o",
                   fake_root.parent / "out", "-q"])
    one_line_error(result, "model.weights.h5", "missing")
    (fake_root / builtin.MANIFEST).unlink()
    result = _run(["register", tiny["fixed"], tiny["moving"], "--model", "builtin", "-o",
                   fake_root.parent / "out", "-q"])
    one_line_error(result, "not installed", "reinstall")


def test_init_builtin_with_model_is_refused(tmp_path, tiny):
    result = _run(["register", tiny["fixed"], tiny["moving"], "--init", "builtin", "--model",
                   "builtin", "-o", tmp_path / "out", "-q"])
    one_line_error(result, "--init builtin", "--model")


def test_the_manifest_notice_is_one_line_with_the_version(fake_root):
    assert builtin.notice(fake_root) is None
    path = fake_root / builtin.MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "notice": "undertrained"}))
    assert builtin.notice(fake_root) == "note: builtin model 9.9: undertrained"
    # the shipped model says what it is worth today, in one line
    shipped = builtin.notice()
    assert shipped is None or (shipped.startswith(f"note: builtin model {builtin.version()}: ")
                               and "\n" not in shipped)
