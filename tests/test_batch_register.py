"""`tfreg register --pairs`: many pairs in one process, resume, shards, summary (2D, 32x32)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg import batch_register
from tfreg.errors import InputError
from tfreg.metrics import dice, mean_dice
from tfreg.synthetic import phantom, smooth_random_field, warp_numpy
from tfreg_cli.main import cli

SHAPE = (32, 32)
QUICK = ["--preset", "fast", "--iterations", "15", "--no-affine", "-q"]


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    """Three 2D pairs (a phantom and a smoothly deformed copy), paths relative to the CSV."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(3):
        rng = np.random.default_rng(10 + i)
        fixed, labels = phantom(SHAPE, rng, jitter=1.0)
        truth = smooth_random_field(SHAPE, max_disp=3.0, smoothness=5.0, rng=rng)
        moving = warp_numpy(fixed, -truth, order=1)
        moving_labels = warp_numpy(labels, -truth, order=0).astype(np.int32)
        names = [f"f{i}.nii.gz", f"m{i}.nii.gz", f"fl{i}.nii.gz", f"ml{i}.nii.gz"]
        for name, data in zip(names, (fixed, moving, labels.astype(np.int32), moving_labels)):
            _save(root / name, data)
        rows.append(names)
    path = root / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        writer.writerows(rows)
    return path


def _run(args: list) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def test_pairs_registered_in_one_process_then_resumed(pairs_csv, tmp_path):
    out = tmp_path / "batch"
    result = _run(["register", "--pairs", pairs_csv, "-o", out, *QUICK])
    assert result.exit_code == 0, result.output
    assert "3 registered" in result.output
    rows = _summary(out)
    assert sorted(rows) == ["0001-f0-m0", "0002-f1-m1", "0003-f2-m2"]
    for i, (name, row) in enumerate(sorted(rows.items())):
        assert row["status"] == "done" and float(row["seconds"]) > 0
        # the summary's Dice is the Dice of the written label map (independent recomputation)
        warped = np.asarray(nib.load(str(out / name / "warped_labels.nii.gz")).dataobj)
        fixed = np.asarray(nib.load(str(pairs_csv.parent / f"fl{i}.nii.gz")).dataobj)
        want = mean_dice(dice(fixed.astype(np.int32), warped.astype(np.int32)))
        assert float(row["mean_dice"]) == pytest.approx(want, abs=1e-4)
        assert float(row["similarity"]) > float(row["similarity_before"])
    stamps = {n: (out / n / "report.json").stat().st_mtime_ns for n in rows}
    again = _run(["register", "--pairs", pairs_csv, "-o", out, *QUICK])
    assert again.exit_code == 0, again.output
    assert "3 done before, 0 to register" in again.output
    assert stamps == {n: (out / n / "report.json").stat().st_mtime_ns for n in rows}
    assert all(r["status"] == "done" for r in _summary(out).values())


def test_shards_split_the_rows_and_failures_are_recorded(pairs_csv, tmp_path):
    bad_root = tmp_path / "in"
    bad_root.mkdir()
    (bad_root / "broken.nii.gz").write_bytes(b"not a nifti file")
    table = pairs_csv.read_text().splitlines()
    csv_path = bad_root / "pairs.csv"
    base = pairs_csv.parent
    lines = [table[0] + ",id"]
    for i, line in enumerate(table[1:]):
        lines.append(",".join(str(base / cell) for cell in line.split(",")) + f",p{i}")
    lines.append(f"broken.nii.gz,{base / 'm0.nii.gz'},,,bad")
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sharded"
    first = _run(["register", "--pairs", csv_path, "--shard", "1/2", "-o", out, *QUICK])
    assert first.exit_code == 0, first.output   # rows 1 and 3: p0, p2
    rows = _summary(out)
    assert [rows[k]["status"] for k in ("p0", "p1", "p2", "bad")] == \
        ["done", "pending", "done", "pending"]
    second = _run(["register", "--pairs", csv_path, "--shard", "2/2", "-o", out, *QUICK])
    assert second.exit_code == 1, second.output  # p1 done, bad failed
    assert "1 of 2 pairs failed" in second.output and "Traceback" not in second.output
    rows = _summary(out)
    assert [rows[k]["status"] for k in ("p0", "p1", "p2", "bad")] == \
        ["done", "done", "done", "failed"]
    assert "broken.nii.gz" in rows["bad"]["error"]
    assert (out / "bad" / "error.txt").is_file() and not (out / "bad" / "report.json").exists()


def test_jobs_register_in_worker_processes(pairs_csv, tmp_path):
    out = tmp_path / "jobs"
    result = _run(["register", "--pairs", pairs_csv, "-o", out, "--jobs", "2", *QUICK])
    assert result.exit_code == 0, result.output
    assert "3 registered" in result.output
    rows = _summary(out)
    assert sorted(rows) == ["0001-f0-m0", "0002-f1-m1", "0003-f2-m2"]
    for i, (name, row) in enumerate(sorted(rows.items())):
        assert row["status"] == "done"
        warped = np.asarray(nib.load(str(out / name / "warped_labels.nii.gz")).dataobj)
        fixed = np.asarray(nib.load(str(pairs_csv.parent / f"fl{i}.nii.gz")).dataobj)
        assert float(row["mean_dice"]) == pytest.approx(
            mean_dice(dice(fixed.astype(np.int32), warped.astype(np.int32))), abs=1e-4)
        assert float(row["similarity"]) > float(row["similarity_before"])
    bad = _run(["register", "a.nii.gz", "b.nii.gz", "--jobs", "2", "-o", tmp_path / "x"])
    assert bad.exit_code != 0 and "--jobs: needs --pairs" in bad.output


def test_read_pairs_rejects_bad_csvs_in_one_line(pairs_csv, tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "p.csv"
        path.write_text(text)
        return path

    base = pairs_csv.parent
    good = f"{base / 'f0.nii.gz'},{base / 'm0.nii.gz'}"
    cases = [
        ("moving\nx.nii.gz\n", "needs a header row with the columns fixed and moving"),
        (f"fixed,moving,mask\n{good},x\n", "unknown column 'mask'"),
        (f"fixed,moving\n{good}\n{base / 'f0.nii.gz'},nope.nii.gz\n",
         "row 2: moving nope.nii.gz: file not found"),
        (f"fixed,moving,id\n{good},a\n{good},a\n", "row 2: id 'a' is also the id of row 1"),
        ("fixed,moving\n", "no pairs"),
        (f"fixed,moving,fixed_labels\n{good},{base / 'fl0.nii.gz'}\n",
         "fixed_labels needs moving_labels"),
    ]
    for text, message in cases:
        with pytest.raises(InputError, match=message):
            batch_register.read_pairs(write(text))
    assert [p.id for p in batch_register.read_pairs(write(f"fixed,moving\n{good}\n\n"))] == \
        ["0001-f0-m0"]
    result = _run(["register", "--pairs", write("fixed\n"), "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = _run(["register", base / "f0.nii.gz", base / "m0.nii.gz", "--pairs", pairs_csv])
    assert result.exit_code == 1 and "give either FIXED MOVING or --pairs" in result.output
    result = _run(["register", "--pairs", pairs_csv, "--moving-labels", base / "ml0.nii.gz"])
    assert result.exit_code == 1 and "--moving-labels: not used with --pairs" in result.output


def test_shard_arithmetic():
    assert batch_register.parse_shard(None) == (1, 1)
    assert batch_register.parse_shard(" 2/5 ") == (2, 5)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(InputError, match="--shard: expected K/N"):
            batch_register.parse_shard(bad)
    rows = list(range(11))
    shares = [batch_register.shard_rows(rows, k, 3) for k in (1, 2, 3)]
    assert sorted(sum(shares, [])) == rows and shares[1] == [1, 4, 7, 10]
