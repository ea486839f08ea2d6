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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated subset of the commands")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
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
