"""Instructions per event of the ingest stages, counted by valgrind's cachegrind.

    python3 -m benchmarks.bench_instructions                      # normalize, pickle, pack, insert
    python3 -m benchmarks.bench_instructions --what normalize --tree /tmp/old-checkout

Wall-clock rates on a shared VM move with the machine (a fixed Python loop took 0.48-1.21 s on
one day), so a change to a stage is judged by the instructions it executes instead: the counts
are deterministic for the same inputs and PYTHONHASHSEED, whatever the machine is doing. Each
figure is a run with three repetitions of the stage minus a run with one, over two, per event, so
the start (imports, building payloads, warming the caches) cancels out. `--tree` counts another
checkout of this repository (its `datasource` package) on the same inputs, for an A/B.

Stages, 2,000 benchmark payloads (the 10 M dataset's shape, seed 6) a repetition:
- normalize: payloads the process has not normalized before (after a warm-up on other ones, so
  the caches hold what repeats in traffic and miss what does not);
- pickle: a normalized group to bytes and back, as it crosses between a worker and the collector;
- pack: `rowpack.pack` of every normalized row;
- insert: `store.insert_batch` of a new 2,000-event group into a fresh file in /dev/shm.
Needs valgrind (Debian: apt-get install valgrind); about a minute per stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

N = 2000
STAGES = ("normalize", "pickle", "pack", "insert")
START_MS = 1_777_593_600_000
SPAN_MS = 518_400 * 4  # 8,000 events at the 10 M dataset's density (2,000 in ~8.6 minutes)
MAX_REPS = 3
_HERE = Path(__file__).resolve().parent
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def run_stage(stage: str, reps: int, n: int = N) -> int:
    """The workload counted under valgrind: a warm-up, then `reps` repetitions of `stage`.
    Returns the items the repetitions handled (for insert: the events the file holds at the end)."""
    from datasource import rowpack, store
    from datasource.db import open_database
    from datasource.parallel import NormalizePool

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if not 1 <= reps <= MAX_REPS:
        raise ValueError(f"reps must be 1 to {MAX_REPS}")
    # the same set-up whatever `reps` is, so that it cancels out of the difference
    raws = list(_shape().payloads(n * (MAX_REPS + 1), START_MS, START_MS + SPAN_MS, seed=6))
    pool = NormalizePool(0, "default")
    groups = [] if stage == "normalize" else \
        [pool.normalize_all(raws[i:i + n]) for i in range(0, len(raws), n)]
    handled = 0
    if stage == "normalize":
        pool.normalize_all(raws[:n])
        for r in range(reps):
            handled += len(pool.normalize_all(raws[n * (r + 1):n * (r + 2)]))
    elif stage == "pickle":
        for _ in range(reps):
            handled += len(pickle.loads(pickle.dumps(groups[0], protocol=pickle.HIGHEST_PROTOCOL)))
    elif stage == "pack":
        for _ in range(reps):
            handled += len([rowpack.pack(item.row) for item in groups[0]])
    else:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            conn = open_database(os.path.join(tmp, "instructions.db"))
            try:
                store.insert_batch(conn, groups[0], origin="collector")
                for group in groups[1:reps + 1]:
                    store.insert_batch(conn, group, origin="collector")
                handled = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            finally:
                conn.close()
    return handled


def _shape():
    """This checkout's benchmarks/shape.py, loaded by path: every tree gets the same payloads."""
    spec = importlib.util.spec_from_file_location("bench_instructions_shape", _HERE / "shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instruction_refs(valgrind_output: str) -> int:
    """The total instructions a cachegrind run reports ("I refs")."""
    match = _REFS.search(valgrind_output)
    if match is None:
        raise ValueError("no 'I refs' line in valgrind's output")
    return int(match.group(1).replace(",", ""))


def count(stage: str, reps: int, tree: Path) -> int:
    """Instructions of one child run: this script by path, `datasource` imported from `tree`."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, str(Path(__file__).resolve()), "--child", stage, str(reps),
                          "--tree", str(tree)],
                         env=env, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return instruction_refs(out.stderr)


def per_event(stage: str, tree: Path) -> int:
    return (count(stage, 3, tree) - count(stage, 1, tree)) // 2 // N


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default=",".join(STAGES), help=f"comma-separated stages: {', '.join(STAGES)}")
    parser.add_argument("--tree", default=str(_HERE.parent),
                        help="a checkout whose datasource package is counted (default: this one)")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(Path(args.tree).resolve()))  # its datasource, ahead of any installed one
        run_stage(args.child[0], int(args.child[1]))
        return 0
    stages = [s for s in args.what.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(unknown)}")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    tree = Path(args.tree).resolve()
    print(f"instructions per event, cachegrind, PYTHONHASHSEED=0, {N} events a repetition, tree {tree}")
    for stage in stages:
        print(f"{stage}: {per_event(stage, tree):,} instructions/event", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
