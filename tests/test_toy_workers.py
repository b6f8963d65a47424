"""Independent work in processes of its own (toy/workers.py): the launcher (two at once on two slots,
in turn on one, a failure named), and a real smoke run whose four student stages train in two
processes at once (`--workers 2`, each `train_toy.py --only-students STAGE`), to the same students
that each stage computes in this process from the same teacher."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train_toy
from tinyteef import checkpoint
from toy import data as toydata
from toy import workers
from toy.methods import STAGES
from toy.presets import PRESETS
from toy.students import result_path, stage_students
from toy.text import PromptBank

STAMP = "import os, sys, time; open(sys.argv[1], 'w').write(f'{time.time()} '); time.sleep(1.0); " \
        "open(sys.argv[1], 'a').write(f'{time.time()} {os.environ.get(\"SLOT\")}')"


def spans(paths):
    return [tuple(open(p).read().split()) for p in paths]


def test_run_all_uses_every_slot_and_names_a_failure(tmp_path):
    paths = [str(tmp_path / f"{k}.txt") for k in range(2)]
    workers.run_all([[sys.executable, "-c", STAMP, p] for p in paths], [{"SLOT": "a"}, {"SLOT": "b"}])
    (s0, e0, slot0), (s1, e1, slot1) = spans(paths)
    assert {slot0, slot1} == {"a", "b"} and float(s1) < float(e0)  # both ran at once
    workers.run_all([[sys.executable, "-c", STAMP, p] for p in paths], [{"SLOT": "a"}])
    (s0, e0, _), (s1, e1, _) = spans(paths)
    assert float(s1) >= float(e0)  # one slot: in turn
    with pytest.raises(RuntimeError, match=r"1 of 2 processes failed; the first: .*exit status 3"):
        workers.run_all([[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", STAMP, paths[0]]],
                        [{}, {}])
    assert len(spans(paths[:1])[0]) == 3  # the other command still finished


def test_student_stages_in_two_processes(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, train_toy.__file__, "--data", "shapes", "--preset", "smoke", "--device", "cpu",
                    "--workers", "2", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    with open(out / "timing.json") as f:
        timing = list(json.load(f))
    assert timing.index("4 students, at once in processes of their own") < timing.index("3 samplers")
    # trained before stage 3 scored anything: by the two processes, not by the run's own stage loop
    first_score = min(os.path.getmtime(out / "scores" / f) for f in os.listdir(out / "scores"))
    assert all(os.path.getmtime(result_path(out, s)) < first_score for s in STAGES)
    assert os.path.exists(out / "report.md")
    # each stage in this process, from the run's own teacher (its teacher.pt, loaded): the same students
    P, dev = PRESETS["smoke"], torch.device("cpu")
    data = toydata.load("shapes", seed=0, limit=P.limit)
    teacher, weak, text, tokenizer, _ = train_toy.stage_teacher(data, P, dev, str(out), 0, "off")
    bank = PromptBank(data, tokenizer, dev)
    for stage in STAGES:
        here, _ = stage_students(data, P, dev, str(tmp_path / "here"), 0, teacher, weak, text, bank, stage, "off")
        there = checkpoint.load(result_path(out, stage))["students"]
        assert len(here) == len(there) >= 1, stage
        for s, state in zip(here.values(), there):
            for key, a in s.state_dict().items():  # to float rounding: thread counts may differ
                assert (a - state[key]).abs().max() <= 1e-5 * a.abs().max(), (stage, key)
