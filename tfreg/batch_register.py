"""Register many pairs in one process: a CSV of pairs in, one output folder per pair, a summary.

The CSV (`read_pairs`) has a header row with the columns ``fixed`` and ``moving`` and optionally
``fixed_labels``, ``moving_labels``, ``fixed_keypoints``, ``moving_keypoints`` and ``id`` (the
name of the pair's output folder; default ``<row>-<fixed stem>-<moving stem>``, rows counted
from 1). Relative paths are relative to the CSV's folder; an empty cell means "none".

Every pair is registered by `tfreg.register.register_files` into ``OUT/<id>/``, in one process:
the compiled optimisation steps are built once per image shape and reused for every later pair
of that shape. A pair is done when its ``report.json`` exists, so a second run with the same
arguments skips the done pairs (resume) and ``shard=(k, n)`` takes every n-th pending row, so
that n processes (or machines sharing the folder) split the work. A pair that fails gets
``OUT/<id>/error.txt`` and the run goes on. ``OUT/summary.csv`` lists every row of the CSV, done
or not, with its figures (`SUMMARY_COLUMNS`); each process rewrites it when it ends.

`register_pairs_parallel` runs several such processes from one (``tfreg register --pairs
--jobs N``): XLA runs each optimisation step on one CPU core and one process keeps about 1.6
cores busy on average, so several jobs pay on machines with more cores than that.
"""
from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfreg.errors import InputError, Interrupted, reason
from tfreg.io import atomic_path

__all__ = ["FILE_COLUMNS", "SUMMARY_COLUMNS", "Pair", "read_pairs", "parse_shard", "shard_rows",
           "is_done", "register_pairs", "register_pairs_parallel", "write_summary"]

#: file columns of the pairs CSV; the first two are required
FILE_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_keypoints",
                "moving_keypoints")

#: columns of summary.csv, figures taken from each pair's report.json
SUMMARY_COLUMNS = ("id", "status", "seconds", "runtime_seconds", "similarity_before",
                   "similarity", "mean_dice_before", "mean_dice", "mean_hd95_mm",
                   "folding_percent", "sdlogj", "tre_mm", "fixed", "moving", "error")

ERROR_FILE = "error.txt"
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.csv"


@dataclass(frozen=True)
class Pair:
    """One row of the pairs CSV: `row` (1-based), output folder name `id`, absolute paths."""

    row: int
    id: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_keypoints: Path | None = None
    moving_keypoints: Path | None = None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "pair"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_pairs(csv_path: str | Path) -> list[Pair]:
    """The pairs of a CSV, every file checked to exist (see the module docstring).

    Raises:
        InputError: one line naming the CSV (and row) and the problem: a missing column or file,
            an unknown column, a duplicate id, no rows, keypoints or labels in one column only.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as fh:
            table = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError(f"{csv_path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{csv_path}: is a folder, not a file") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{csv_path}: not a readable CSV file ({reason(err)})") from None
    header = [c.strip() for c in table[0]] if table else []
    missing = [c for c in ("fixed", "moving") if c not in header]
    if missing:
        raise InputError(f"{csv_path}: needs a header row with the columns fixed and moving "
                         f"(missing: {', '.join(missing)}; found: {', '.join(header) or 'none'})")
    unknown = [c for c in header if c not in FILE_COLUMNS + ("id",)]
    if unknown:
        raise InputError(f"{csv_path}: unknown column {unknown[0]!r} (columns: id, "
                         f"{', '.join(FILE_COLUMNS)})")
    base = csv_path.resolve().parent
    pairs, seen = [], {}
    for number, values in enumerate(table[1:], start=1):
        cells = {name: value.strip() for name, value in zip(header, values)}
        if not any(cells.values()):
            continue  # blank line
        where = f"{csv_path} row {number}"
        files: dict[str, Path | None] = {}
        for column in FILE_COLUMNS:
            text = cells.get(column, "")
            if not text:
                if column in ("fixed", "moving"):
                    raise InputError(f"{where}: no {column} image")
                files[column] = None
                continue
            path = Path(text).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise InputError(f"{where}: {column} {text}: "
                                 + ("is a folder, not a file" if path.is_dir()
                                    else "file not found"))
            files[column] = path
        if (files["fixed_keypoints"] is None) != (files["moving_keypoints"] is None):
            raise InputError(f"{where}: give both fixed_keypoints and moving_keypoints, or neither")
        if files["fixed_labels"] is not None and files["moving_labels"] is None:
            raise InputError(f"{where}: fixed_labels needs moving_labels (Dice compares the "
                             "warped moving labels with the fixed ones)")
        name = _safe_name(cells.get("id") or
                          f"{number:04d}-{_stem(files['fixed'])}-{_stem(files['moving'])}")
        if name in seen:
            raise InputError(f"{where}: id {name!r} is also the id of row {seen[name]}")
        seen[name] = number
        pairs.append(Pair(number, name, **files))
    if not pairs:
        raise InputError(f"{csv_path}: no pairs (only a header row)")
    return pairs


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: the second of four shares; None -> ``(1, 1)``.

    Raises:
        InputError: not ``K/N`` with ``1 <= K <= N``.
    """
    if text is None:
        return 1, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise InputError(f"--shard: expected K/N with 1 <= K <= N (e.g. 1/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def shard_rows(pairs: Sequence[Pair], k: int, n: int) -> list[Pair]:
    """Share `k` of `n` (1-based): the rows whose position in the CSV is ``k - 1`` modulo `n`.

    The split depends on the CSV only (not on what is done), so processes started with
    ``1/n`` ... ``n/n`` never register the same pair.
    """
    return [p for i, p in enumerate(pairs) if i % n == k - 1]


def is_done(pair: Pair, out_dir: str | Path) -> bool:
    """Whether the pair's output folder holds a report (written last by `register_files`)."""
    return (Path(out_dir) / pair.id / REPORT_FILE).is_file()


def register_pairs(pairs: Sequence[Pair], out_dir: str | Path, *,
                   on_pair: Callable[[Pair, dict[str, Any]], None] | None = None,
                   **options: Any) -> list[dict[str, Any]]:
    """Register `pairs` not done yet, one after the other, in this process.

    Args:
        pairs: rows to consider (e.g. a shard); done ones are skipped.
        out_dir: parent folder of the per-pair output folders.
        on_pair: called after each pair with the pair and its row of the summary.
        options: keyword arguments of `tfreg.register.register_files` shared by every pair
            (config, model, finetune, device, inverse, itk, ...).

    Returns:
        One summary row (`SUMMARY_COLUMNS`) per registered or failed pair; ``status`` is
        ``"done"`` or ``"failed"`` (any error but an interrupt: an unreadable NIfTI, images of
        different dimensions, out of memory; its first line goes to ``error.txt``).
    """
    from tfreg.register import register_files

    out_dir = Path(out_dir)
    rows = []
    for pair in pairs:
        if is_done(pair, out_dir):
            continue
        folder = out_dir / pair.id
        start = time.perf_counter()
        try:
            report, _ = register_files(
                pair.fixed, pair.moving, folder, fixed_labels=pair.fixed_labels,
                moving_labels=pair.moving_labels, fixed_keypoints=pair.fixed_keypoints,
                moving_keypoints=pair.moving_keypoints, **options)
        except Interrupted:
            raise
        except Exception as err:  # noqa: BLE001 - one bad pair must not end a long batch
            message = reason(err)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / ERROR_FILE) as tmp:
                tmp.write_text(message + "\n")
            row = _summary_row(pair, None, time.perf_counter() - start, message)
        else:
            (folder / ERROR_FILE).unlink(missing_ok=True)
            row = _summary_row(pair, report, time.perf_counter() - start, None)
        rows.append(row)
        if on_pair is not None:
            on_pair(pair, row)
    return rows


def register_pairs_parallel(pairs: Sequence[Pair], out_dir: str | Path, jobs: int, *,
                            on_pair: Callable[[Pair, dict[str, Any]], None] | None = None,
                            **options: Any) -> list[dict[str, Any]]:
    """`register_pairs` in `jobs` worker processes, each with a share of `pairs`
    (`shard_rows`) and ``cores // jobs`` TensorFlow threads; `on_pair` runs here, in this
    process, as their pairs finish.

    Each worker starts Python and TensorFlow (a few seconds) and keeps its own compiled steps;
    the persistent XLA cache (`tfreg.xla_cache`) and the store of traced steps
    (`tfreg.trace_store`) are shared. Memory: `jobs` times one
    registration's.

    Raises:
        InputError: a worker ended without finishing its share (its pairs stay pending: rerun
            to resume). On any exception here (e.g. Ctrl-C) the workers are stopped.
    """
    import multiprocessing
    import os
    import queue as queue_module

    shares = [share for share in (shard_rows(pairs, k, jobs) for k in range(1, jobs + 1))
              if share]
    if len(shares) <= 1:
        return register_pairs(pairs, out_dir, on_pair=on_pair, **options)
    threads = max(1, len(os.sched_getaffinity(0)) // len(shares))
    from tfreg import trace_store

    stored = trace_store.folder()
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    workers = [context.Process(target=_pairs_worker, name=f"tfreg-pairs-{k}", daemon=True,
                               args=(messages, k, share, str(out_dir), options, threads,
                                     None if stored is None else str(stored.parent)))
               for k, share in enumerate(shares, 1)]
    by_id = {pair.id: pair for pair in pairs}
    rows: list[dict[str, Any]] = []
    running = set(range(1, len(workers) + 1))
    try:
        for worker in workers:
            worker.start()
        while running:
            try:
                kind, k, row = messages.get(timeout=1.0)
            except queue_module.Empty:
                dead = [k for k in running if not workers[k - 1].is_alive()]
                if dead and messages.empty():
                    codes = ", ".join(f"worker {k}: exit {workers[k - 1].exitcode}"
                                      for k in dead)
                    raise InputError(f"--jobs: a worker process ended early ({codes}); its "
                                     "pending pairs were not registered (rerun to resume)")
                continue
            if kind == "end":
                running.discard(k)
            else:
                rows.append(row)
                if on_pair is not None:
                    on_pair(by_id[row["id"]], row)
    finally:
        for worker in workers:
            if worker.is_alive() and running:
                worker.terminate()
            worker.join(timeout=10)
    return rows


def _pairs_worker(messages, k: int, pairs: Sequence[Pair], out_dir: str, options: dict,
                  threads: int, trace_folder: str | None = None) -> None:
    """One worker of `register_pairs_parallel` (a fresh process): its own XLA cache folder, the
    parent's trace store (`trace_folder`, None: off) and thread count, then `register_pairs`,
    each row sent back as ``("row", k, row)``."""
    import os

    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
    from tfreg import trace_store, xla_cache

    xla_cache.enable_in_child()
    if trace_folder is not None:  # the parent's store of traced steps (`tfreg.trace_store`)
        trace_store.enable(trace_folder)
    try:
        register_pairs(pairs, out_dir, on_pair=lambda pair, row: messages.put(("row", k, row)),
                       **options)
    finally:
        xla_cache.publish()
        messages.put(("end", k, None))


def _summary_row(pair: Pair, report: dict | None, seconds: float | None,
                 error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in SUMMARY_COLUMNS}
    row.update(id=pair.id, fixed=str(pair.fixed), moving=str(pair.moving))
    if report is not None:
        row["status"] = "done"
        for column in SUMMARY_COLUMNS[3:-3]:
            value = report.get(column)
            row[column] = "" if value is None else value
        if seconds is not None:
            row["seconds"] = round(float(seconds), 3)
    elif error is not None:
        row.update(status="failed", error=error)
        if seconds is not None:
            row["seconds"] = round(seconds, 3)
    else:
        row["status"] = "pending"
    return row


def write_summary(pairs: Sequence[Pair], out_dir: str | Path,
                  recent: Sequence[dict[str, Any]] = ()) -> Path:
    """Write ``OUT/summary.csv``: every pair of the CSV, from the pair folders' reports (done),
    error files (failed) or neither (pending); `recent` rows (this process's) give the wall
    seconds per pair (blank for pairs done by another process). Atomic; returns the path."""
    out_dir = Path(out_dir)
    seconds = {r["id"]: r.get("seconds") for r in recent}
    lines = []
    for pair in pairs:
        folder = out_dir / pair.id
        report = None
        if (folder / REPORT_FILE).is_file():
            try:
                report = json.loads((folder / REPORT_FILE).read_text())
            except (OSError, ValueError):
                report = None
        error = None
        if report is None and (folder / ERROR_FILE).is_file():
            error = (folder / ERROR_FILE).read_text().strip() or "failed"
        row = _summary_row(pair, report, None, error)
        if seconds.get(pair.id) not in (None, ""):
            row["seconds"] = seconds[pair.id]
        lines.append(row)
    path = out_dir / SUMMARY_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(lines)
    return path
