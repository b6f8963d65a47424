"""train_toy.py --seeds: the statistics over seeds (against scipy and by hand), the launcher's
processes (two at once on two slots, in turn on one, a failure named), and the coordinator end to
end with stand-in seed runs whose tables are known, so the merged report's numbers can be checked."""

import json
import math
import os
import sys

import pytest

import train_toy
from toy import seeds, workers
from toy.methods import STUDENTS, TEACHER_SAMPLERS
from toy.stats import interval, paired, t_quantile

from conftest import oracle


def test_t_quantile_matches_scipy():
    stats = oracle("scipy.stats")
    for df in range(1, 80):
        assert abs(t_quantile(df) - stats.t.ppf(0.975, df)) < 1e-3, df
    with pytest.raises(ValueError, match="at least 2 values"):
        t_quantile(0)


def test_interval_and_paired_by_hand():
    # [1, 2, 3]: mean 2, sample sd 1, half-width t_{0.975, 2} / sqrt(3) = 4.303 / 1.7321 = 2.4843
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 4.303 / math.sqrt(3)) < 1e-9
    assert interval([5.0]) == (5.0, None)
    # differences [1, 1.1, 0.9]: mean 1, sd 0.1, half 0.2484: excludes 0 -> +1; [1, -1, 0.5] holds 0 -> 0
    assert paired([2.0, 2.1, 1.9], [1.0, 1.0, 1.0])[2] == 1
    assert paired([1.0, 1.0, 1.0], [2.0, 2.1, 1.9])[2] == -1
    assert paired([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])[2] == 0
    assert paired([3.0], [1.0])[2] == 0  # one seed: no interval, nothing held


FAKE_SEED = """import json, os, sys
out = sys.argv[sys.argv.index('--out') + 1]
seed = int(sys.argv[sys.argv.index('--seed') + 1])
os.makedirs(out, exist_ok=True)
rows = json.loads(os.environ['ROWS'])
table = {n: {'accuracy': 0.5, 'fd': fd + seed * step, 'rms': 0.1, 'ms': 1.0, 'passes': 1, 'nominal': 1,
             'guidance': 5.0} for n, (fd, step) in rows.items()}
json.dump(table, open(os.path.join(out, 'table.json'), 'w'))
open(os.path.join(out, 'argv.txt'), 'w').write(' '.join(sys.argv[1:]))
"""


def test_seeds_end_to_end_with_stand_in_runs(tmp_path, monkeypatch):
    script = tmp_path / "fake_seed.py"
    script.write_text(FAKE_SEED)
    names = [*TEACHER_SAMPLERS, *STUDENTS]
    # Fréchet distance per row: base + seed * step. TeEFusion: 1.0, 1.1, 1.2; DistillCFG: 2.0, 2.0, 2.0:
    # the difference -1.0, -0.9, -0.8 (mean -0.9, sd 0.1, half 0.2484): TeEFusion held better
    rows = {n: (3.0, 0.0) for n in names}
    rows["TeEFusion from W2SD+CFG"], rows["DistillCFG from W2SD+CFG"] = (1.0, 0.1), (2.0, 0.0)
    monkeypatch.setenv("ROWS", json.dumps(rows))
    monkeypatch.setattr(workers, "command", lambda _, argv: [sys.executable, str(script), *argv])
    out = str(tmp_path / "run")
    train_toy.main(["--data", "shapes", "--device", "cpu", "--seeds", "0", "1", "2", "--workers", "2", "--out", out])
    assert "--data shapes --preset smoke --compile off --device cpu" in open(os.path.join(out, "seed-1", "argv.txt")).read()
    report = open(os.path.join(out, "report.md")).read()
    half = 4.303 * 0.1 / math.sqrt(3)
    assert f"| TeEFusion from W2SD+CFG | 5.0 | 1 | 50.0 ± 0.0 | {1.1:.3f} ± {half:.3f} |" in report
    assert f"| TeEFusion vs DistillCFG (Table 3) | {-0.9:.3f} ± {half:.3f} | first better |" in report
    assert "| TeEFusion vs G(psi(w)) ablation (Table 3) |" in report  # 1.1 vs 3.0 every seed: held too
    # a second invocation finds every seed's table and launches nothing
    monkeypatch.setattr(workers, "run_all", lambda commands, slots: commands and pytest.fail("relaunched"))
    train_toy.main(["--data", "shapes", "--device", "cpu", "--seeds", "0", "1", "2", "--out", out])
    for extra in (["--seed", "1"], ["--only-students", "cfg"]):  # one run's flags: refused with --seeds
        with pytest.raises(SystemExit, match="give it without --seed and --only-students"):
            train_toy.main(["--data", "shapes", "--device", "cpu", "--seeds", "0", "--out", out, *extra])
    with pytest.raises(SystemExit, match="--workers must be at least 1, got 0"):  # no slot would run forever
        train_toy.main(["--data", "shapes", "--device", "cpu", "--seeds", "5", "--workers", "0", "--out", out])
    with pytest.raises(SystemExit, match="holds a single-seed run"):
        os.makedirs(tmp_path / "single", exist_ok=True)
        (tmp_path / "single" / "config.json").write_text("{}")
        train_toy.main(["--data", "shapes", "--device", "cpu", "--seeds", "0", "--out", str(tmp_path / "single")])


def test_two_seed_smoke_run(tmp_path):
    # the real thing, on the CPU: two smoke runs as two processes at once, then the report over them
    out = str(tmp_path / "run")
    train_toy.main(["--data", "shapes", "--device", "cpu", "--preset", "smoke", "--seeds", "0", "1",
                    "--workers", "2", "--out", out])
    tables = [json.load(open(os.path.join(out, f"seed-{s}", "table.json"))) for s in (0, 1)]
    assert list(tables[0]) == list(tables[1]) and tables[0] != tables[1]  # the same rows, other seeds
    report = open(os.path.join(out, "report.md")).read()
    for name, row in tables[0].items():  # every row as mean ± half-width, the mean the two seeds' mean
        mean = (row["fd"] + tables[1][name]["fd"]) / 2
        assert f"| {name} | " in report and f"| {mean:.3f} ± " in report, name
    for what, _, _ in seeds.comparisons(tables[0]):
        assert f"| {what} | " in report, what
