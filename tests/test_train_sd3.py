"""train_sd3.py on the tiny random SD3 folder, on the CPU: every teacher runs and saves a student
that diffusers loads; a resumed run continues exactly; two gloo processes under torchrun give the
losses of one; --compile changes the losses by float rounding only; bad input gets one clear message."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train_sd3
from conftest import assert_close_to_reference, oracle
from tinyteef import checkpoint
from tinyteef.safetensors import load_file, save_file
from tinyteef.sd3 import cache
from tinyteef.sd3.loader import load_student, load_transformer
from tinyteef.sd3.tiny import write_tiny_sd3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red cat", "a blue dog on the beach", "a photo of a golden robot", "an old man in the city",
            "a green bird", "a white horse at night"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_tiny_sd3(root / "teacher", seed=0), write_tiny_sd3(root / "weak", seed=1)


def write_png(image, path):
    """(3, H, W) uint8 -> PNG file."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def write_images(folder, n=len(CAPTIONS), captions=True):
    """n random PNGs of different sizes (not square: the loader crops), a caption .txt beside each."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_png((torch.rand(3, 72 + 8 * i, 64, generator=g) * 255).to(torch.uint8), os.path.join(folder, f"{i}.png"))
        if captions:
            with open(os.path.join(folder, f"{i}.txt"), "w") as f:
                f.write(CAPTIONS[i % len(CAPTIONS)])
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data"))


def argv(models, data, out, teacher="w2sd", steps=4, *extra):
    return ["--model", models[0], "--weak-model", models[1], "--data", data, "--out", str(out),
            "--teacher", teacher, "--resolution", "64", "--batch-size", "4", "--micro-batch", "1",
            "--steps", str(steps), "--save-every", "2", "--preview-every", "2", "--device", "cpu", *extra]


def losses(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


@pytest.mark.parametrize("teacher", ["cfg", "zsampling", "w2sd"])
def test_each_teacher_trains_and_diffusers_loads_the_student(models, data, tmp_path, teacher):
    diffusers = oracle("diffusers")
    out = tmp_path / teacher
    train_sd3.main(argv(models, data, out, teacher, 2))
    assert len(losses(out)) == 2 and all(torch.isfinite(torch.tensor(losses(out))))
    assert os.path.isfile(out / "previews" / "step_000002.png")
    ours, H = load_transformer(str(out / "student"))
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(str(out / "student" / "transformer")).eval()
    teacher_model, _ = load_transformer(models[0])
    # the saved student is the trained one: it equals the checkpoint, not the teacher
    state = checkpoint.load(out / "checkpoint.pt")["student"]
    assert H is None and torch.equal(ours.proj_out.weight, state["model.proj_out.weight"])
    assert not torch.equal(ours.proj_out.weight, teacher_model.proj_out.weight)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    tokens, pooled = torch.randn(2, 333, 64, generator=g), torch.randn(2, 48, generator=g)
    with torch.no_grad():
        ref = theirs(hidden_states=x, timestep=1000 * t, encoder_hidden_states=tokens,
                     pooled_projections=pooled).sample
        assert_close_to_reference(ours.eval()(x, t, tokens, pooled), ref, what="student velocity")
    # the whole folder is an SD3 pipeline: the other components link to the teacher's
    assert os.path.realpath(out / "student" / "vae") == os.path.realpath(os.path.join(models[0], "vae"))
    if teacher == "cfg":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out / "student"))
        assert torch.equal(pipe.transformer.proj_out.weight, ours.proj_out.weight)


def test_resume_continues_exactly(models, data, tmp_path):
    train_sd3.main(argv(models, data, tmp_path / "whole", "w2sd", 4))
    train_sd3.main(argv(models, data, tmp_path / "parts", "w2sd", 2))
    with pytest.raises(SystemExit, match="pass --resume"):
        train_sd3.main(argv(models, data, tmp_path / "parts", "w2sd", 4))
    train_sd3.main(argv(models, data, tmp_path / "parts", "w2sd", 4, "--resume"))
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")  # bit for bit
    a, b = (checkpoint.load(tmp_path / p / "checkpoint.pt") for p in ("whole", "parts"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])


def torchrun(nproc, args):
    """train_sd3.py under torchrun; --standalone picks a free port, so runs side by side cannot collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "train_sd3.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in r.stderr.splitlines() if "Error" in line]  # every rank's, not only the last
    assert r.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + r.stderr[-2000:]


def test_two_processes_give_the_losses_of_one(models, data, tmp_path):
    """DDP over gloo: each process takes half of the 4 micro-batches of a step; the step's loss and
    update are those of one process at the same global batch, up to float summation order
    (measured: relative differences ~3e-7; tolerance 1e-5)."""
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, argv(models, data, one, "w2sd", 4, "--preview-every", "0"))
    torchrun(2, argv(models, data, two, "w2sd", 2, "--preview-every", "0"))
    assert sorted(os.listdir(two)) == ["cache", "checkpoint.pt", "config.json", "log.jsonl", "student", "student.1"]
    torchrun(2, argv(models, data, two, "w2sd", 4, "--preview-every", "0", "--resume"))
    assert len(losses(one)) == 4
    for key in ("loss", "grad_norm"):  # AdamW hides a wrongly scaled gradient; its norm does not
        assert torch.allclose(torch.tensor(losses(two, key)), torch.tensor(losses(one, key)), rtol=1e-5, atol=0)


def test_compile_changes_the_losses_by_rounding_only(models, data, tmp_path):
    """--compile (each block through torch.compile; inductor's C++ on the CPU) gives the losses and
    gradient norms of the eager run up to float rounding (measured: relative differences up to
    1.1e-7, one float32 ulp; tolerance 1e-6), keeps the state_dict keys, and a resume may switch it
    off. Compiling takes most of the ~45 s of this test (cold inductor cache, 2 CPU cores)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_sd3.main(argv(models, data, eager, "w2sd", 2, "--preview-every", "0"))
    train_sd3.main(argv(models, data, compiled, "w2sd", 2, "--preview-every", "0", "--compile"))
    for key in ("loss", "grad_norm"):
        assert torch.allclose(torch.tensor(losses(compiled, key)), torch.tensor(losses(eager, key)), rtol=1e-6, atol=0)
    a, b = (checkpoint.load(p / "checkpoint.pt")["student"] for p in (eager, compiled))
    assert list(a) == list(b) and not any("_orig_mod" in k for k in b)
    weights = os.path.join("student", "transformer", "diffusion_pytorch_model.safetensors")
    assert load_file(os.path.join(compiled, weights)).keys() == load_file(os.path.join(eager, weights)).keys()
    train_sd3.main(argv(models, data, compiled, "w2sd", 3, "--preview-every", "0", "--resume"))  # eager now
    assert len(losses(compiled)) == 3


def test_distillcfg_student_saves_its_guidance_mlp_and_record(models, data, tmp_path):
    out = tmp_path / "dcfg"
    train_sd3.main(argv(models, data, out, "cfg", 2, "--student", "distillcfg", "--preview-every", "0",
                        "--w-min", "3", "--w-max", "9"))
    student = load_student(str(out / "student"))
    state = checkpoint.load(out / "checkpoint.pt")["student"]
    assert student.kind == "distillcfg" and student.w_range == (3.0, 9.0)
    with open(out / "student" / "transformer" / "config.json") as f:
        assert json.load(f)["tinyteef"]["w_rounding"] == "float32"  # ours are distilled with float32 1000 w
    assert torch.equal(student.H.linear_2.weight, state["H.linear_2.weight"])
    assert student.H.linear_2.weight.abs().sum() > 0  # trained away from its zero init
    record = json.loads((out / "student" / "transformer" / "config.json").read_text())["tinyteef"]
    assert record["distill"]["t_dist"] == "uniform" and record["effective_guidance"] == "CFG at w"


def test_t_dist_and_effective_guidance_are_recorded(models, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_sd3.parse_args(["--help"])
    assert "--t-dist {uniform,logit-normal}" in capsys.readouterr().out
    out = tmp_path / "ln"
    train_sd3.main(argv(models, data, out, "zsampling", 1, "--t-dist", "logit-normal", "--preview-every", "0"))
    assert "to first order in the step CFG at 2w + 1" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["t_dist"] == "logit-normal"
    record = json.loads((out / "student" / "transformer" / "config.json").read_text())["tinyteef"]
    assert record["distill"]["t_dist"] == "logit-normal" and record["distill"]["w_inv"] == -1.0
    assert record["effective_guidance"] == "CFG at 2w + 1"
    # a resume with another p(t) is another run: refused
    with pytest.raises(SystemExit, match="--t-dist 'logit-normal'"):
        train_sd3.main(argv(models, data, out, "zsampling", 2, "--preview-every", "0", "--resume"))


def test_random_init_tiny_runs_without_data(tmp_path):
    out = tmp_path / "rand"
    train_sd3.main(["--random-init", "tiny", "--teacher", "w2sd", "--out", str(out), "--resolution", "64",
                    "--batch-size", "2", "--micro-batch", "2", "--steps", "1", "--device", "cpu"])
    assert len(losses(out)) == 1 and os.path.isdir(out / "student" / "transformer")


def test_random_init_stopped_while_writing_does_not_break_the_folder(tmp_path, monkeypatch):
    # a run stopped while writing the weak model's tiny folder: the retry writes it again and runs
    from tinyteef.sd3 import tiny
    out = tmp_path / "rand"
    args = ["--random-init", "tiny", "--teacher", "w2sd", "--out", str(out), "--resolution", "64",
            "--batch-size", "2", "--micro-batch", "2", "--steps", "1", "--device", "cpu"]
    write = tiny.write_t5_tokenizer
    calls = {"n": 0}

    def stop_in_the_second_folder(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return write(*a, **k)
    monkeypatch.setattr(tiny, "write_t5_tokenizer", stop_in_the_second_folder)
    with pytest.raises(KeyboardInterrupt):
        train_sd3.main(args)
    assert os.path.isdir(out / "random-init" / "teacher") and not os.path.exists(out / "random-init" / "weak")
    monkeypatch.setattr(tiny, "write_t5_tokenizer", write)
    train_sd3.main(args)
    assert len(losses(out)) == 1 and not os.path.exists(out / "random-init" / "weak.partial")


def test_resume_keeps_each_step_once_in_the_log_and_removes_stale_temps(models, data, tmp_path):
    # a run killed after logging step 3 but before saving it, and a save killed before its rename:
    # the resumed run logs steps 3 and 4 once each and deletes the stale temporary file
    out = tmp_path / "run"
    args = argv(models, data, out, "cfg", 2, "--preview-every", "0")
    train_sd3.main(args)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')  # killed mid-write
    (out / ".tmp-killed.pt").write_bytes(b"half a checkpoint")
    args[args.index("--steps") + 1] = "4"
    train_sd3.main(args + ["--resume"])
    assert losses(out, "step") == [1, 2, 3, 4]
    assert not (out / ".tmp-killed.pt").exists()


def test_non_finite_loss_stops_before_the_update(models, data, tmp_path):
    teacher = write_tiny_sd3(tmp_path / "teacher", seed=0)
    out = tmp_path / "run"
    args = argv((teacher, models[1]), data, out, "cfg", 2, "--preview-every", "0")
    train_sd3.main(args)
    before = (out / "checkpoint.pt").read_bytes()
    weights = os.path.join(teacher, "transformer", "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    state["proj_out.bias"] = torch.full_like(state["proj_out.bias"], float("nan"))
    save_file(state, weights)
    args[args.index("--steps") + 1] = "4"
    with pytest.raises(SystemExit, match=r"non-finite loss .* at step 3 \(log.jsonl's numbering\); stopped before "
                                         r"the update, the last good checkpoint in .* is kept"):
        train_sd3.main(args + ["--resume"])  # steps 1 and 2 are logged, step 3 fails
    assert (out / "checkpoint.pt").read_bytes() == before
    assert len(losses(out)) == 2
    # a run that fails before its first save says there is no checkpoint, rather than one "kept"
    fresh = argv((teacher, models[1]), data, tmp_path / "fresh", "cfg", 2, "--preview-every", "0")
    with pytest.raises(SystemExit, match=r"at step 1 .*stopped before the update, no checkpoint yet"):
        train_sd3.main(fresh)


def error_of(args, capsys):
    with pytest.raises(SystemExit) as e:
        train_sd3.main(args)
    return f"{e.value.code} {capsys.readouterr().err}"


def test_bad_input(models, data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in error_of(argv(models, str(empty), tmp_path / "a"), capsys)
    no_captions = write_images(tmp_path / "nocap", 2, captions=False)
    msg = error_of(argv(models, no_captions, tmp_path / "b"), capsys)
    assert "2 image(s)" in msg and "have no caption" in msg and "metadata.jsonl" in msg
    msg = error_of(["--model", models[0], "--data", data, "--teacher", "w2sd"], capsys)
    assert msg.startswith("2 ") and "needs --weak-model DIR" in msg and "--teacher zsampling" in msg
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    (broken / "x.txt").write_text("a cat")
    assert "no image in the data folder could be decoded (1 skipped)" in error_of(
        argv(models, str(broken), tmp_path / "e"), capsys)
    train_sd3.main(argv(models, data, tmp_path / "c", "cfg", 1, "--preview-every", "0"))
    msg = error_of(argv(models, data, tmp_path / "c", "cfg", 2, "--resume", "--lr", "1e-4"), capsys)
    assert "holds a run with --lr 5e-06, this one asks for 0.0001" in msg
    assert "--preview-w 20 must lie in [--w-min, --w-max] = [2, 14]" in error_of(
        argv(models, data, tmp_path / "d", "cfg", 1, "--preview-w", "20"), capsys)
    # with no previews to draw, --preview-w is not used, so it is not checked
    assert train_sd3.parse_args(argv(models, data, tmp_path / "d", "cfg", 1, "--preview-w", "20",
                                     "--preview-every", "0")).preview_w == 20


def test_undecodable_image_is_skipped_and_counted(models, tmp_path, capsys):
    folder = write_images(tmp_path / "data", 3)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data" / "broken.txt").write_text("a broken file")
    train_sd3.main(argv(models, folder, tmp_path / "run", "cfg", 1, "--preview-every", "0"))
    out = capsys.readouterr().out
    assert "warning: skipping" in out and "broken.png" in out and "3 images cached" in out and "1 skipped" in out


def test_metadata_jsonl_layout(tmp_path):
    from tinyteef.sd3.data import list_items
    folder = write_images(tmp_path / "d", 2, captions=False)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write('{"file_name": "1.png", "text": "second"}\n\n{"file_name": "0.png", "text": "first"}\n')
    assert list_items(folder) == [(os.path.join(folder, "1.png"), "second"), (os.path.join(folder, "0.png"), "first")]
    with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
        f.write('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match="line 4: expected a JSON object"):
        list_items(folder)


def test_load_image_crops_the_centre_and_resizes(tmp_path):
    from tinyteef.sd3.data import load_image
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    image[:, :, 16:48] = 255  # white centre square, black side bands
    write_png(image, str(tmp_path / "a.png"))
    assert torch.equal(load_image(str(tmp_path / "a.png"), 32), torch.ones(3, 32, 32))
    flat = torch.full((3, 64, 128), 51, dtype=torch.uint8)  # a constant stays constant after resizing
    write_png(flat, str(tmp_path / "b.png"))
    assert torch.allclose(load_image(str(tmp_path / "b.png"), 16), torch.full((3, 16, 16), 51 / 127.5 - 1))


def test_stale_cache_is_refused(tmp_path):
    made = {"resolution": 64, "encoder_dtype": "torch.float32", "t5_length": 256}
    cache.check_settings(str(tmp_path), made)
    cache.check_settings(str(tmp_path), made)  # the same settings: accepted
    with pytest.raises(ValueError, match="made with encoder_dtype = 'torch.float32' but this run asks for "
                                         "'torch.bfloat16'"):
        cache.check_settings(str(tmp_path), {**made, "encoder_dtype": "torch.bfloat16"})


def test_global_rows_visit_every_row_once_per_epoch():
    n, batch = 10, 4  # 5 steps = 20 positions = 2 epochs
    stream = [r for step in range(5) for r in train_sd3.global_rows(7, step, batch, n)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch has its own order
