"""Nothing silent, nothing stuck (issue 21): train_sd3.py re-encodes the cache entries whose image or
caption changed, checks every flag, model config, folder and checkpoint before any work, stops an
absurd update before saving it, says a full disk or a read-only --out in one line, and keeps a
complete student/ at every instant; the toy names a broken .gz and counts --data-root in its run."""

import json
import os
import resource
import shutil
import signal
import subprocess

import pytest
import torch

import train_sd3
import train_toy
from conftest import random_mmdit
from test_toy_data import fashion_files
from test_train_sd3 import argv, data, losses, models, write_images, write_png  # noqa: F401 (fixtures)
from tinyteef.distill import MAX_NORM_GROWTH, step_problem, weights_norm
from tinyteef.guidance import Student
from tinyteef.sd3 import cache, loader
from toy.data import load as load_toy_data


def test_cache_reencodes_what_changed(models, tmp_path):
    """A caption edited and a corrupt image replaced by a good one, then stage 1 again into the same
    cache: both are encoded (as a cache built from scratch on the edited folder holds them) and the
    unchanged images are not encoded again."""
    folder = write_images(tmp_path / "data", 3)
    (tmp_path / "data" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "data" / "bad.txt").write_text("a fixed image")
    build = lambda where: cache.build(str(where), models[0], folder, 32, 8, 1, torch.device("cpu"))  # one by one
    first = build(tmp_path / "cache")
    assert len(first) == 3 and first.skipped == [os.path.join(folder, "bad.png")]
    inode = lambda i: os.stat(cache.item_path(str(tmp_path / "cache"), i)).st_ino
    kept = inode(0)
    (tmp_path / "data" / "1.txt").write_text("a golden robot at night")
    write_png((torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8),
              str(tmp_path / "data" / "bad.png"))
    again, fresh = build(tmp_path / "cache"), build(tmp_path / "fresh")
    assert len(again) == 4 and again.skipped == [] and inode(0) == kept
    (x, c), (x_ref, c_ref) = again.get(range(4), "cpu"), fresh.get(range(4), "cpu")
    assert torch.equal(x, x_ref) and torch.equal(c.tokens, c_ref.tokens) and torch.equal(c.pooled, c_ref.pooled)


def test_cache_of_other_encoder_weights_is_refused(models, tmp_path):
    """New text encoder or VAE weights at the same --model path: the cache encoded from the old ones
    is refused in one line naming a changed file. The transformer's files are not the cache's, so a
    new transformer keeps it; neither is looked at for a cache made before the files were recorded."""
    model = tmp_path / "model"
    shutil.copytree(models[0], model)
    folder = write_images(tmp_path / "data", 2)
    build = lambda: cache.build(str(tmp_path / "cache"), str(model), folder, 32, 8, 2, torch.device("cpu"))
    build()
    for sub in ("transformer",):  # rewritten, one second later: the cache stays
        for name in os.listdir(model / sub):
            os.utime(model / sub / name, ns=(0, os.stat(model / sub / name).st_mtime_ns + 10**9))
    build()
    vae = next(f for f in sorted(os.listdir(model / "vae")) if f.endswith(".safetensors"))
    os.utime(model / "vae" / vae, ns=(0, os.stat(model / "vae" / vae).st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=f"encoded from other text encoder or VAE files of {model} "
                                         f"\\(vae/{vae} and 0 more changed size or time\\): delete"):
        build()
    settings = tmp_path / "cache" / "settings.json"  # as a cache written before encoder_files existed
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "encoder_files"}))
    assert len(build()) == 2


def test_update_check_threshold_by_hand():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
        layer.bias.fill_(12.0)
    assert weights_norm(layer) == 13.0  # sqrt(9 + 16 + 144)
    assert MAX_NORM_GROWTH == 2.0
    assert step_problem(5, 0.3, 1.0, before=10.0, after=20.0) is None  # at most doubled: kept
    assert "more than 2x in one step" in step_problem(5, 0.3, 1.0, before=10.0, after=20.01)
    assert "more than 2x" in step_problem(5, 0.3, 1.0, before=10.0, after=float("inf"))
    assert "non-finite loss (nan)" in step_problem(5, float("nan"), 1.0)


class AbsurdAdamW(torch.optim.AdamW):
    """AdamW at lr 1e30 whatever its state says (a resume restores the lr of the checkpoint)."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = 1e30
        return super().step(closure)


def test_absurd_update_stops_before_saving(models, data, tmp_path, monkeypatch):
    # --lr 1e30 leaves every weight finite at ±1e30: stopped at step 1, nothing saved
    out = tmp_path / "fresh"
    with pytest.raises(SystemExit, match=r"the update of step 1 .* took the norm of the student's weights from "
                                         r".* lower --lr; stopped before saving it, no checkpoint yet"):
        train_sd3.main(argv(models, data, out, "cfg", 1, "--lr", "1e30", "--preview-every", "0"))
    assert not (out / "checkpoint.pt").exists() and not (out / "student").exists() and losses(out) == []
    # a run that goes wrong after a good checkpoint keeps it, and its student, byte for byte
    out = tmp_path / "run"
    args = argv(models, data, out, "cfg", 2, "--preview-every", "0")
    train_sd3.main(args)
    weights = out / "student" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = (out / "checkpoint.pt").read_bytes(), weights.read_bytes()
    monkeypatch.setattr(torch.optim, "AdamW", AbsurdAdamW)
    args[args.index("--steps") + 1] = "3"  # step 3 is saved, as the last step
    with pytest.raises(SystemExit, match=r"update of step 3 .*the last good checkpoint in .* is kept"):
        train_sd3.main(args + ["--resume"])
    assert ((out / "checkpoint.pt").read_bytes(), weights.read_bytes()) == before and len(losses(out)) == 2


def students(n):
    return [Student(random_mmdit(seed), w_range=(2.0, 14.0)) for seed in range(n)]


def test_student_folder_is_complete_at_every_instant(tmp_path, monkeypatch):
    """A save stopped at each of its file-system changes in turn (the k-th rename, link or removal):
    `student` loads after every one, as the old student or the new one."""
    folder = str(tmp_path / "student")
    old, new = students(2)
    loader.save_student(folder, old)
    weight = lambda s: s.model.proj_out.weight
    k, done = 0, False
    while not done:
        k += 1
        calls = {"n": 0}

        def stop_at_k(fn):
            def wrapped(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == k:
                    raise KeyboardInterrupt  # as a kill there would
                return fn(*args, **kwargs)
            return wrapped
        for module, name in ((os, "replace"), (os, "rename"), (os, "symlink"), (os, "remove"), (shutil, "rmtree")):
            monkeypatch.setattr(module, name, stop_at_k(getattr(module, name)))
        try:
            loader.save_student(folder, new)
            done = True
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        loaded = weight(loader.load_student(folder))
        assert torch.equal(loaded, weight(new)) or (not done and torch.equal(loaded, weight(old))), k
    assert k > 3  # the save was stopped at every step before it finished
    # what the stopped saves left beside it is gone after the complete one
    assert sorted(os.listdir(tmp_path)) == ["student", os.readlink(folder)]


def test_student_folder_of_an_older_run_becomes_a_link(tmp_path):
    old, new = students(2)
    folder = tmp_path / "student"
    loader.save_transformer(folder, old.model)  # a plain folder, as saves before versions wrote it
    loader.save_student(str(folder), new)
    assert os.path.islink(folder) and sorted(os.listdir(tmp_path)) == ["student", "student.1"]
    assert torch.equal(loader.load_student(str(folder)).model.proj_out.weight, new.model.proj_out.weight)


def error_of(args, capsys):
    with pytest.raises(SystemExit) as e:
        train_sd3.main(args)
    return f"{e.value.code} {capsys.readouterr().err}"


BAD_FLAGS = [
    (("--resolution", "0"), "--resolution must be at least 1, got 0"),
    (("--resolution", "-16"), "--resolution must be at least 1"),
    (("--resolution", "40"), "--resolution 40 must be a multiple of 16 (the VAE's 8x times the patch size 2"),
    # the tiny teacher's position table: 16 patches of 16 px a side
    (("--resolution", "272"), "--resolution 272 is beyond the position table of --model (16 patches of 16 px a side): "
                              "use at most 256"),
    (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    (("--steps", "0"), "--steps must be at least 1, got 0"),
    (("--steps", "-2"), "--steps must be at least 1, got -2"),
    (("--w-min", "10", "--w-max", "5"), "--w-min 10 is above --w-max 5"),
    (("--lr", "nan"), "--lr must be a positive number, got nan"),
    (("--device", "cuda"), "--device cuda, but torch sees no GPU; use --device cpu"),
    (("--weak-model", "WEAK"), "has joint_attention_dim 32, the teacher 64: W2SD's weak model must take"),
]


@pytest.mark.parametrize("extra, expected", BAD_FLAGS, ids=[" ".join(extra) for extra, _ in BAD_FLAGS])
def test_bad_flags_stop_before_any_work(models, data, tmp_path, capsys, extra, expected):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is there")
    if "WEAK" in extra:  # a weak model whose transformer takes other text: its config.json is read, not loaded
        weak = tmp_path / "weak"
        shutil.copytree(models[1], weak, symlinks=True)
        config = json.loads((weak / "transformer" / "config.json").read_text())
        (weak / "transformer" / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 32}))
        extra = ("--weak-model", str(weak))
    out = tmp_path / "out"
    msg = error_of(argv(models, data, out, "w2sd", 2, *extra), capsys)
    last = msg.strip().splitlines()[-1]  # argparse's usage, then one line: "PROG: error: ..."
    assert msg.startswith("2 ") and ": error: " in last and expected in last, msg
    assert not out.exists()  # nothing written, no stage 1


def test_random_init_sizes_are_checked_before_its_folder_is_written(tmp_path, capsys):
    # --random-init tiny's sizes are known before its folder is written: 16 patches of 16 px
    msg = error_of(["--random-init", "tiny", "--teacher", "cfg", "--out", str(tmp_path / "r"), "--resolution", "512",
                    "--device", "cpu"], capsys)
    assert "beyond the position table of --random-init tiny" in msg and not (tmp_path / "r").exists()


def test_failed_start_writes_no_config(models, data, tmp_path, capsys):
    # the retry with a corrected --data is the same run, not one refused for another --data
    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in error_of(argv(models, str(empty), out, "cfg", 1), capsys)
    assert not (out / "config.json").exists()
    train_sd3.main(argv(models, data, out, "cfg", 1, "--preview-every", "0"))
    assert len(losses(out)) == 1


@pytest.fixture
def one_step(models, data, tmp_path):
    out = tmp_path / "run"
    train_sd3.main(argv(models, data, out, "cfg", 1, "--preview-every", "0"))
    return out


def test_resume_checks_that_the_checkpoint_is_this_runs(models, data, one_step, capsys):
    # the checkpoint says which run it belongs to, even when config.json is gone
    out = one_step
    os.remove(out / "config.json")
    msg = error_of(argv(models, data, out, "cfg", 2, "--preview-every", "0", "--resume", "--lr", "1e-4"), capsys)
    assert f"{out / 'checkpoint.pt'} holds a run with --lr 5e-06, this one asks for 0.0001" in msg


def test_resume_with_nothing_left_to_do_says_so(models, data, one_step, capsys):
    assert "is at step 1 already: give --steps above it" in error_of(
        argv(models, data, one_step, "cfg", 1, "--preview-every", "0", "--resume"), capsys)


def test_corrupt_checkpoint_is_one_line_before_stage_1(models, data, one_step, capsys):
    out = one_step
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip")
    shutil.rmtree(out / "cache")
    msg = error_of(argv(models, data, out, "cfg", 2, "--preview-every", "0", "--resume"), capsys)
    assert msg.startswith(f"error: {out / 'checkpoint.pt'} is not a readable checkpoint") and "\n" not in msg.strip()
    assert "delete it and run again without --resume" in msg and not (out / "cache").exists()


def test_read_only_out_is_one_line(models, data, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through chmod; the immutable flag stops root too (ext4, xfs)
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
            pytest.skip("running as root where chattr +i is not available: cannot make a folder read-only")
        undo = ["chattr", "-i", str(out)]
    else:
        out.chmod(0o555)
        undo = ["chmod", "755", str(out)]
    try:
        msg = error_of(argv(models, data, out, "cfg", 1), capsys)
        assert msg.startswith(f"error: {out}: ") and "check its permissions" in msg and "\n" not in msg.strip()
        assert os.listdir(out) == []
    finally:
        subprocess.run(undo, check=True)


def test_full_disk_is_one_line_and_keeps_the_checkpoint(models, data, tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail (EFBIG) as a full disk does (ENOSPC), torch's
    C++ writer included: the checkpoint is 3x the student's weights, the limit half of it."""
    out = tmp_path / "run"
    args = argv(models, data, out, "cfg", 2, "--preview-every", "0")
    train_sd3.main(args)
    before = (out / "checkpoint.pt").read_bytes()
    args[args.index("--steps") + 1] = "4"
    handler, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
    try:
        with pytest.raises(SystemExit) as e:
            train_sd3.main(args + ["--resume"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(e.value.code).startswith(f"error: {out / 'checkpoint.pt'}: File too large; ")
    assert "the last one is kept" in e.value.code and "\n" not in e.value.code
    assert (out / "checkpoint.pt").read_bytes() == before and not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_broken_gz_names_the_file(tmp_path):
    fashion_files(tmp_path, gz=True)
    labels = str(tmp_path / "train-labels-idx1-ubyte.gz")
    with open(labels, "rb") as f:
        whole = f.read()
    for broken, cause in ((whole[:len(whole) // 2], "EOFError"), (b"not gzip at all", "BadGzipFile")):
        with open(labels, "wb") as f:
            f.write(broken)
        with pytest.raises(ValueError, match=f"^{labels} cannot be read \\({cause}: .*; delete it and fetch it again"):
            load_toy_data("fashion-mnist", root=tmp_path, download=False)


def test_toy_data_root_is_part_of_the_run(tmp_path, monkeypatch):
    for root in ("a", "b"):
        fashion_files(tmp_path / root, gz=True)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # after config.json: the rest of the run is not needed here
    monkeypatch.setattr(train_toy, "stage_evaluator", stop)
    run = lambda root: train_toy.main(["--data", "fashion-mnist", "--data-root", str(tmp_path / root),
                                       "--device", "cpu", "--out", str(tmp_path / "out")])
    for _ in range(2):  # the same run, twice
        with pytest.raises(Stop):
            run("a")
    with pytest.raises(SystemExit, match="another --data, --data-root, --preset or --seed"):
        run("b")

