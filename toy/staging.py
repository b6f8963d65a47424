"""How a toy run lives in --out: what defines it (OUT/config.json: another dataset, preset or seed
is another run, refused rather than mixed with this one's cached stages), its stages cached (a
stage's result is saved when it is computed and loaded when it is there: a stopped run resumes, a
finished one re-reports fast) and timed (the seconds of each stage summed over the run's
invocations in OUT/timing.json, for the report's per-stage timing table)."""

import json
import os
import time
from contextlib import contextmanager

import torch

from tinyteef import checkpoint
from tinyteef.checkpoint import atomic_write

from .presets import with_defaults


def check_run(out, run):
    """Refuse an --out that holds another run than `run` (its config.json differs)."""
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        # a preset's fields added since it was written at their defaults, those of this run's record only
        preset = {k: v for k, v in with_defaults(stored.get("preset", {})).items() if k in run["preset"]}
        if {**stored, "preset": preset} != json.loads(json.dumps(run)):
            raise SystemExit(f"error: {out} holds a run with another --data, --data-root, --preset or --seed; "
                             "use another --out or delete that folder")


def record_run(out, run, started):
    """Write OUT/config.json (atomically: a run stopped mid-write must not leave a half file that
    breaks the next invocation) and, on the first invocation, OUT/started; returns when the first
    invocation began, for the end-to-end time."""
    atomic_write(os.path.join(out, "config.json"), lambda f: f.write(json.dumps(run, indent=1).encode()))
    path = os.path.join(out, "started")
    if not os.path.exists(path):
        atomic_write(path, lambda f: f.write(str(started).encode()))
    with open(path) as f:
        return float(f.read())


def staged(path, compute):
    """Load a stage's result from `path`, or compute it and save it there (atomically)."""
    if os.path.exists(path):
        return checkpoint.load(path)
    result = compute()
    checkpoint.save(result, path)
    return result


class Clock:
    """Wall seconds per stage, summed over every invocation of the run (a resumed stage adds the
    time of each part; a stage loaded from the cache adds the little its loading takes). `out`
    None: kept in memory only (a process that trains one student stage for the run, whose own
    clock counts that time)."""

    def __init__(self, out):
        self.path = out and os.path.join(out, "timing.json")
        self.seconds = {}
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.seconds = json.load(f)

    @contextmanager
    def stage(self, name):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the GPU's queued work belongs to this stage
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.path:
            atomic_write(self.path, lambda f: f.write(json.dumps(self.seconds, indent=1).encode()))

    def section(self):
        """The report's table: seconds and share of each stage. Returns (title, lines)."""
        total = sum(self.seconds.values())
        lines = ["Wall seconds of each stage, summed over the run's invocations (compilation included, on "
                 "the fast path); the rest of the end-to-end time is start-up and data loading.", "",
                 "| stage | seconds | share |", "|---|---|---|"]
        lines += [f"| {name} | {s:.1f} | {s / total:.0%} |" for name, s in self.seconds.items()]
        return "Time per stage", lines + [f"| total | {total:.1f} | 100% |"]
