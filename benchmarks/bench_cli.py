"""Wall-clock times of whole `tfreg` commands, as a user sees them.

The registration benchmark (`bench_register.py`) times registration only (arrays in memory, no
interpreter start, no file I/O). A user running `tfreg register` also waits for Python and
TensorFlow to start and for the files to be read and written; this script measures those whole
commands in fresh processes, next to the `runtime_seconds` the command reports, and records the
machine's load (1-minute load average before and after each command), so quoted figures say
under which conditions they were taken.

Commands:

* `error`: `tfreg register missing.nii.gz ...` (a user mistake: answered before TensorFlow loads);
* `import`: `python -c "import tensorflow"` (TensorFlow's start-up alone);
* `demo`: `tfreg demo` (64 x 72 x 64 sample, default preset);
* `oasis-fast`, `oasis`: `tfreg register` of the OASIS sample pair (160 x 192 x 144, label maps),
  `--preset fast` and the default preset.

Usage::

    python benchmarks/bench_cli.py                    # all, once each
    python benchmarks/bench_cli.py --only error,demo --repeat 3
    python benchmarks/bench_cli.py --vs-ants          # whole `tfreg register` vs ANTs SyN

`--vs-ants` builds the 96x112x96 benchmark pairs of `bench_register.py`, then alternates, pair by
pair, a whole `tfreg register F M -o OUT --preset fast` (or `--preset accurate`, the default
preset) with both label maps (process start to
exit, a fresh process each time; the XLA cache and the store of traced steps start empty, so the
first call traces and compiles and the later ones load) and ANTs SyN with antspyx defaults (against `accurate`: SyN(100, 70, 50)) in a
fresh process of a separate environment
(`--ants-python`, default `/tmp/antsenv/bin/python`: `python -m venv /tmp/antsenv &&
/tmp/antsenv/bin/pip install antspyx`), timing its registration call only. Then
`tfreg register --pairs` registers the same pairs in one process, then with `--jobs N` (`--jobs`,
default 2) in N worker processes (seconds per pair). Results:
`benchmarks/results/bench_cli_vs_ants.json` (`..._accurate.json`).

Results: a table on stdout and `benchmarks/results/bench_cli.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OASIS = ROOT.parent / "shared" / "data" / "oasis_pair"
RESULTS = ROOT / "benchmarks" / "results"


def _tfreg(*args: str) -> list[str]:
    return [sys.executable, "-m", "tfreg", *args]


def commands(work: Path) -> dict[str, list[str]]:
    a, b = OASIS / "image_A_160x192x144.nii.gz", OASIS / "image_B_160x192x144.nii.gz"
    labels = ["--fixed-labels", str(OASIS / "image_A_160x192x144_seg.nii.gz"),
              "--moving-labels", str(OASIS / "image_B_160x192x144_seg.nii.gz")]
    return {
        "error": _tfreg("register", "missing.nii.gz", str(a), "-o", str(work / "never")),
        "import": [sys.executable, "-c", "import tensorflow"],
        "demo": _tfreg("demo", "-o", str(work / "demo"), "-q"),
        "oasis-fast": _tfreg("register", str(a), str(b), "-o", str(work / "fast"), "--preset",
                             "fast", "-q", *labels),
        "oasis": _tfreg("register", str(a), str(b), "-o", str(work / "accurate"), "-q", *labels),
    }


def _report_runtime(work: Path, name: str) -> float | None:
    folder = {"demo": work / "demo" / "registration", "oasis-fast": work / "fast",
              "oasis": work / "accurate"}.get(name)
    if folder is None or not (folder / "report.json").is_file():
        return None
    return float(json.loads((folder / "report.json").read_text())["runtime_seconds"])


ANTS_WORKER = """
import json, sys, time
import ants
import numpy as np
fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
start = time.perf_counter()
iterations = tuple(int(v) for v in sys.argv[3].split(",")) if len(sys.argv) > 3 else (40, 20, 0)
result = ants.registration(fixed, moving, type_of_transform="SyN", reg_iterations=iterations)
seconds = time.perf_counter() - start
out = {"registration_s": seconds}
if len(sys.argv) > 5:  # label maps: mean Dice over the fixed map's labels (as tfreg reports it)
    fixed_labels = ants.image_read(sys.argv[4]).numpy().astype(int)
    warped = ants.apply_transforms(fixed, ants.image_read(sys.argv[5]), result["fwdtransforms"],
                                   interpolator="genericLabel").numpy().astype(int)
    dice = [2.0 * np.sum((fixed_labels == k) & (warped == k))
            / (np.sum(fixed_labels == k) + np.sum(warped == k))
            for k in np.unique(fixed_labels) if k != 0]
    out["dice"] = float(np.mean(dice))
print(json.dumps(out))
"""


def _timed(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float,
                                                              float]:
    """Run a command; (process, wall seconds, CPU seconds of the child)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


#: ANTs SyN iterations compared with each tfreg preset (issue: fast vs antspyx's defaults,
#: accurate vs SyN(100, 70, 50))
ANTS_ITERATIONS = {"fast": "40,20,0", "accurate": "100,70,50"}


def _write_pairs(pair_ids: list[str], work: Path) -> dict[str, dict[str, str]]:
    """The benchmark pairs of `bench_register.py` as NIfTI files in `work` and `pairs.csv`."""
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_register import build_pair

    files: dict[str, dict[str, str]] = {}
    lines = ["fixed,moving,fixed_labels,moving_labels,id"]
    for pid in pair_ids:
        pair = build_pair(*pid.split("-"))
        affine = np.diag(list(pair["spacing"]) + [1.0])
        files[pid] = {}
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            path = work / f"{pid}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(pair[key], affine), str(path))
            files[pid][key] = str(path)
        lines.append(",".join([files[pid][k] for k in ("fixed", "moving", "fixed_labels",
                                                       "moving_labels")] + [pid]))
    (work / "pairs.csv").write_text("\n".join(lines) + "\n")
    return files


def pairs_jobs(pair_ids: list[str], jobs_list: list[int], preset: str = "fast",
               repeats: int = 2) -> None:
    """`tfreg register --pairs` with each `--jobs` value, alternated `repeats` times after one
    run that fills the XLA cache: seconds per pair (`results/bench_pairs_jobs.json`)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "TFREG_XLA_CACHE": str(work / "xla")}
        _write_pairs(pair_ids, work)

        def batch(folder: str, jobs: int) -> list[str]:
            return _tfreg("register", "--pairs", str(work / "pairs.csv"), "-o",
                          str(work / folder), "--preset", preset, "-q", "--jobs", str(jobs))

        _timed(batch("warm", 1), env)
        for repeat in range(repeats):
            for jobs in (jobs_list if repeat % 2 == 0 else jobs_list[::-1]):
                load = os.getloadavg()[0]
                proc, wall, cpu = _timed(batch(f"run{repeat}-{jobs}", jobs), env)
                rows.append({"jobs": jobs, "repeat": repeat, "exit": proc.returncode,
                             "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                             "per_pair_s": round(wall / len(pair_ids), 2),
                             "load_before": round(load, 2)})
                print(json.dumps(rows[-1]), flush=True)
    info = {"cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": preset,
            "pairs": pair_ids, "rows": rows}
    from tfreg.io import atomic_path

    with atomic_path(RESULTS / "bench_pairs_jobs.json") as out:
        out.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def vs_ants(pair_ids: list[str], ants_python: str, preset: str = "fast", jobs_max: int = 2
            ) -> None:
    """Whole `tfreg register` calls and a `--pairs` batch next to ANTs SyN (module docstring)."""
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # both persistent caches start empty: the first call traces, stores and compiles
        env = {**os.environ, "TFREG_XLA_CACHE": str(work / "xla"),
               "TFREG_TRACE_CACHE": str(work / "traces")}
        files = _write_pairs(pair_ids, work)
        for index, pid in enumerate(pair_ids):
            f = files[pid]
            tfreg_cmd = _tfreg("register", f["fixed"], f["moving"], "-o", str(work / pid),
                               "--preset", preset, "-q", "--fixed-labels", f["fixed_labels"],
                               "--moving-labels", f["moving_labels"])
            ants_cmd = [ants_python, "-c", ANTS_WORKER, f["fixed"], f["moving"],
                        ANTS_ITERATIONS[preset], f["fixed_labels"], f["moving_labels"]]
            order = [("tfreg", tfreg_cmd), ("ants", ants_cmd)]
            for name, cmd in (order if index % 2 == 0 else order[::-1]):
                load = os.getloadavg()[0]
                proc, wall, cpu = _timed(cmd, env)
                row = {"pair": pid, "tool": name, "exit": proc.returncode, "wall_s": round(wall, 2),
                       "cpu_s": round(cpu, 2), "load_before": round(load, 2)}
                if name == "tfreg":
                    report = work / pid / "report.json"
                    if report.is_file():
                        data = json.loads(report.read_text())
                        row.update(runtime_s=data["runtime_seconds"], dice=data.get("mean_dice"),
                                   cache="cold" if index == 0 else "warm")
                elif proc.returncode == 0:
                    done = json.loads(proc.stdout.strip().splitlines()[-1])
                    row["registration_s"] = round(done["registration_s"], 2)
                    if "dice" in done:
                        row["dice"] = round(done["dice"], 5)
                else:
                    row["error"] = proc.stderr.strip().splitlines()[-1:]
                rows.append(row)
                print(json.dumps(row), flush=True)
        for jobs in sorted({1, jobs_max}):
            load = os.getloadavg()[0]
            batch_cmd = _tfreg("register", "--pairs", str(work / "pairs.csv"), "-o",
                               str(work / f"batch{jobs}"), "--preset", preset, "-q",
                               "--jobs", str(jobs))
            proc, wall, cpu = _timed(batch_cmd, env)
            rows.append({"pair": "all", "tool": "tfreg --pairs" + (
                             f" --jobs {jobs}" if jobs > 1 else ""),
                         "exit": proc.returncode, "wall_s": round(wall, 2),
                         "cpu_s": round(cpu, 2), "per_pair_s": round(wall / len(pair_ids), 2),
                         "load_before": round(load, 2),
                         "output": proc.stdout.strip().splitlines()[-2:]})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for tool, key in (("tfreg", "wall_s"), ("ants", "registration_s"), ("tfreg", "dice"),
                      ("ants", "dice")):
        values = [r[key] for r in rows if r["tool"] == tool and key in r]
        summary[f"{tool} mean {key}"] = round(float(np.mean(values)), 2) if values else None
    warm = [r["wall_s"] for r in rows if r.get("cache") == "warm"]
    summary["tfreg warm-cache mean wall_s"] = round(float(np.mean(warm)), 2) if warm else None
    if summary["ants mean registration_s"] and summary["tfreg mean wall_s"]:
        summary["ANTs registration / tfreg whole command"] = round(
            summary["ants mean registration_s"] / summary["tfreg mean wall_s"], 3)
        if warm:
            summary["ANTs registration / tfreg whole command, warm cache"] = round(
                summary["ants mean registration_s"] / summary["tfreg warm-cache mean wall_s"], 3)
        for row in rows:
            if row["tool"].startswith("tfreg --pairs"):
                summary[f"ANTs registration / {row['tool']} per pair"] = round(
                    summary["ants mean registration_s"] / row["per_pair_s"], 3)
    for name, value in summary.items():
        print(f"{name}: {value}")
    info = {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "note": "shared 2-core machine: see load_before; compare within the run",
            "preset": preset, "ants_syn_iterations": ANTS_ITERATIONS[preset],
            "rows": rows, "summary": summary}
    from tfreg.io import atomic_path

    name = "bench_cli_vs_ants.json" if preset == "fast" else f"bench_cli_vs_ants_{preset}.json"
    with atomic_path(RESULTS / name) as out:
        out.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated subset of the commands")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--vs-ants", action="store_true",
                        help="whole tfreg register calls and --pairs next to ANTs SyN")
    parser.add_argument("--pairs", default="01-02,03-04,05-06",
                        help="with --vs-ants or --pairs-jobs")
    parser.add_argument("--ants-python", default="/tmp/antsenv/bin/python", help="with --vs-ants")
    parser.add_argument("--jobs", type=int, default=2,
                        help="with --vs-ants: also `--pairs --jobs N` (1: only one process)")
    parser.add_argument("--pairs-jobs", default=None, metavar="1,2",
                        help="only time `--pairs` with each of these --jobs values")
    parser.add_argument("--preset", default="fast", choices=sorted(ANTS_ITERATIONS),
                        help="with --vs-ants: tfreg's preset; ANTs SyN runs antspyx's default "
                             "iterations (40, 20, 0) against fast, (100, 70, 50) against accurate")
    args = parser.parse_args()
    if args.vs_ants:
        vs_ants(args.pairs.split(","), args.ants_python, args.preset, args.jobs)
        return
    if args.pairs_jobs:
        pairs_jobs(args.pairs.split(","), [int(v) for v in args.pairs_jobs.split(",")],
                   args.preset)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table = commands(work)
        names = args.only.split(",") if args.only else list(table)
        for name in names:
            for _ in range(args.repeat):
                load_before = os.getloadavg()[0]
                start = time.perf_counter()
                proc = subprocess.run(table[name], capture_output=True, text=True, cwd=work)
                wall = time.perf_counter() - start
                rows.append({"command": name, "wall_s": round(wall, 2),
                             "runtime_s": _report_runtime(work, name),
                             "exit": proc.returncode, "load_before": round(load_before, 2),
                             "load_after": round(os.getloadavg()[0], 2),
                             "stderr_lines": len(proc.stderr.splitlines())})
                print(f"{name:<11} wall {wall:7.2f} s  report {rows[-1]['runtime_s']}  "
                      f"exit {proc.returncode}  load {load_before:.1f}->"
                      f"{rows[-1]['load_after']:.1f}  stderr lines "
                      f"{rows[-1]['stderr_lines']}", flush=True)
    info = {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from tfreg.io import atomic_path

    with atomic_path(RESULTS / "bench_cli.json") as out:
        out.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
