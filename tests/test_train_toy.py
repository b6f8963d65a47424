"""train_toy.py: a stopped stage resumes to exactly what an uninterrupted run computes, finished
stages are not recomputed, and a folder of another configuration is refused."""

import dataclasses
import json
import os
import re
import time

import pytest
import torch

import train_toy
from toy import students
from tinyteef import checkpoint
from toy import data as toydata
from toy.presets import with_defaults

TINY = dataclasses.replace(train_toy.PRESETS["smoke"], limit=(200, 50), eval_steps=5, teacher_steps=20,
                           batch=8, sample_steps=2, n_eval=16, distill_steps=4, distill_batch=4,
                           sweep=(2.0, 14.0), save_every=10, time_batch=16, curve=(2, 4))


class Stop(Exception):
    pass


def counted(fn, calls):
    """fn, counting its calls in calls["n"]."""
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        return fn(*args, **kwargs)
    return wrapper


def test_stopped_teacher_resumes_exactly(tmp_path, monkeypatch):
    data = toydata.load("shapes", limit=TINY.limit)
    dev = torch.device("cpu")
    whole = train_toy.stage_teacher(data, TINY, dev, str(tmp_path / "whole"), 0, "off")[0]

    calls = {"n": 0}
    update = train_toy.ema_update

    def stop_at_step_15(ema, model, decay):
        calls["n"] += 1
        if calls["n"] == 15:  # after the checkpoint of step 10, before the end
            raise Stop
        update(ema, model, decay)
    monkeypatch.setattr(train_toy, "ema_update", stop_at_step_15)
    with pytest.raises(Stop):
        train_toy.stage_teacher(data, TINY, dev, str(tmp_path / "resumed"), 0, "off")
    assert os.path.exists(tmp_path / "resumed" / "teacher.partial.pt")
    calls["n"] = 0  # the resumed run counts its own steps: it continues from step 10 of 20
    monkeypatch.setattr(train_toy, "ema_update", counted(update, calls))
    resumed = train_toy.stage_teacher(data, TINY, dev, str(tmp_path / "resumed"), 0, "off")[0]
    assert calls["n"] == TINY.teacher_steps - 10  # not started again from step 0
    assert not os.path.exists(tmp_path / "resumed" / "teacher.partial.pt")
    assert list(whole.state_dict()) == list(resumed.state_dict())
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_stopped_students_resume_exactly(tmp_path, monkeypatch):
    # W2SD's students include DistillCFG, whose H must come back from the checkpoint too
    P = dataclasses.replace(TINY, distill_steps=6, save_every=3)
    data = toydata.load("shapes", limit=P.limit)
    dev = torch.device("cpu")
    teacher, weak, text, tokenizer, _ = train_toy.stage_teacher(data, P, dev, str(tmp_path / "t"), 0, "off")
    bank = train_toy.PromptBank(data, tokenizer, dev)
    args = (data, P, dev)
    run = lambda out: students.stage_students(*args, str(out), 0, teacher, weak, text, bank, "w2sd", "off")[0]
    whole = run(tmp_path / "whole")

    calls = {"n": 0}
    step = students.teacher_target  # called once per step (Alg. 1 lines 8-11)

    def stop_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint of step 3, before the end
            raise Stop
        return step(*a, **k)
    monkeypatch.setattr(students, "teacher_target", stop_at_step_5)
    with pytest.raises(Stop):
        run(tmp_path / "resumed")
    assert os.path.exists(tmp_path / "resumed" / "students_w2sd.partial.pt")
    calls["n"] = 0  # the resumed run counts its own steps: it continues from step 3 of 6
    monkeypatch.setattr(students, "teacher_target", counted(step, calls))
    resumed = run(tmp_path / "resumed")
    assert calls["n"] == 3  # not started again from step 0
    assert any(s.H is not None for s in resumed.values())
    assert list(whole) == list(resumed)
    for name in whole:
        assert list(whole[name].state_dict()) == list(resumed[name].state_dict()), name
        for (key, a), b in zip(whole[name].state_dict().items(), resumed[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)


def test_whole_run_then_cached_then_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(train_toy.PRESETS, "smoke", TINY)
    out = str(tmp_path / "run")
    train_toy.main(["--data", "shapes", "--device", "cpu", "--out", out])
    cached = ("teacher.pt", "students_w2sd.pt", "sweep.pt", "negative.pt", "fidelity.pt",
              "scores/teacher_euler_cfg_w_ramp_2_8.pt")
    for name in ("report.md", "grid_w.png", "fidelity.png", "losses.png", "colour_w.png", "embedding.png") + cached:
        assert os.path.exists(os.path.join(out, name)), name
    report = open(os.path.join(out, "report.md")).read()
    assert report.count("\n| ") >= 2 + len(train_toy.STUDENTS) + 5  # header rows, 5 teachers, students
    # each row says its effective guidance at w = 5, its students the same as their teacher
    for name in ("Teacher Z-Sampling+CFG", "TeEFusion from Z-Sampling+CFG"):
        assert f"\n| {name} | CFG at 2w + 1 = 11 |" in report, name
    for name in ("Teacher W2SD+CFG", "DistillCFG from W2SD+CFG", "G(psi(w)) from W2SD+CFG"):
        assert f"\n| {name} | CFG at w = 5 + (strong - weak) |" in report, name
    assert "\n| Teacher Euler+CFG | CFG at w = 5 |" in report and "t ~ uniform" in report
    for section in ("Guidance schedule against the constant w = 5, at equal cost", "Negative prompts",
                    "Fidelity: each student's velocity error", "Colour across w", "Loss curves of every training stage",
                    "Distillation curve (Fig. 5b in small)", "Fig. 6 in small: the vector each student adds to z",
                    "Time per stage"):
        assert f"\n## {section}" in report, section
    # the seconds of every stage (OUT/timing.json, also the report's last table), and the main table
    # that a run over several seeds merges (OUT/table.json), every row of the report in it
    with open(os.path.join(out, "timing.json")) as f:
        assert list(json.load(f)) == ["1 evaluator", "2 teacher", "3 samplers", "4 students from Euler+CFG",
                                      "4 students from Z-Sampling+CFG", "4 students from W2SD+CFG",
                                      "4 students from W2SD+CFG, t logit-normal", "4 students scored", "w sweep",
                                      "5 schedule", "6 negative", "7 fidelity", "distillation curve", "embedding"]
    with open(os.path.join(out, "table.json")) as f:
        table = json.load(f)
    matched = ["Teacher Euler+CFG at w = 11 (Z-Sampling+CFG's effective guidance)", "TeEFusion from Euler+CFG at w = 11"]
    assert list(table) == [*train_toy.teacher_methods(None, None, 5.0), *train_toy.STUDENTS, *matched]
    assert table[matched[0]]["matches"] == "Teacher Z-Sampling+CFG" and table[matched[0]]["guidance"] == "CFG at w = 11"
    # Fig. 5b: the W2SD+CFG students kept at steps 2 and 4 of 4, scored; the last is the final student
    assert "| 2 | " in report and "| 4 | " in report and os.path.exists(os.path.join(out, "curve.png"))
    final = dict(checkpoint.load(os.path.join(out, "curve.pt"))["TeEFusion from W2SD+CFG"])[4]
    assert final["fd"] == pytest.approx(table["TeEFusion from W2SD+CFG"]["fd"], rel=1e-6)
    assert final["rms"] == pytest.approx(table["TeEFusion from W2SD+CFG"]["rms"], rel=1e-6)
    assert all(f"\n| {name} | " in report for name in table)
    # every stage's loss curve is drawn: evaluator, teacher, and the students of 3 teacher samplers
    assert report.count("| students from ") == len(train_toy.STUDENTS)
    assert "| evaluator (cross-entropy) | evaluator |" in report and "| teacher (flow matching) | teacher |" in report
    stamps = {name: os.path.getmtime(os.path.join(out, name)) for name in cached}
    with open(os.path.join(out, "started"), "w") as f:  # as if the first invocation began 2 hours ago
        f.write(str(time.time() - 7200))
    train_toy.main(["--data", "shapes", "--device", "cpu", "--out", out])  # every stage cached
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in cached} == stamps
    this, since = map(int, re.search(r"wall time: (\d+) s this invocation, (\d+) s since the first",
                                     open(os.path.join(out, "report.md")).read()).groups())
    assert this < 600 and 7200 <= since < 7200 + 600
    with pytest.raises(SystemExit, match="another --data, --data-root, --preset or --seed"):
        train_toy.main(["--data", "shapes", "--device", "cpu", "--out", out, "--seed", "1"])


def test_run_folder_of_an_older_preset_stays_valid():
    # config.json of a run made before the preset had eval_width and eval_batch: that run trained
    # the evaluator at their defaults (32 wide, batch 256), as quick and full still do
    for name, same in (("quick", True), ("full", True), ("smoke", False)):
        now = dataclasses.asdict(train_toy.PRESETS[name])
        older = {k: v for k, v in now.items() if k not in ("eval_width", "eval_batch")}
        assert (with_defaults(older) == now) == same, name
    assert (train_toy.PRESETS["quick"].eval_width, train_toy.PRESETS["quick"].eval_batch) == (32, 256)
