"""train_sd3.py --fsdp (tinyteef/parallel.py) on the CPU over gloo, and the SD3.5 sizes of --random-init.

Two processes with FSDP2 give the losses and gradient norms of one process at the same global
batch; a sharded run stopped at step 2 and resumed equals an uninterrupted one bit for bit; the
student read whole from the shards is the trained one, and diffusers loads it; an absurd update or
a damaged shard stops every process with the same line. On the CPU FSDP computes, gathers and
reduces in float32 (parallel.shard), as DDP does there."""

import os
import re
import resource
import signal
import socket
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import train_sd3
from conftest import assert_close_to_reference, oracle
from test_train_sd3 import ROOT, argv, data, losses, models, torchrun  # noqa: F401 (fixtures)
from tinyteef.bench import SIZES
from tinyteef.mmdit import MMDiT, MMDiTConfig
from tinyteef.safetensors import load_file
from tinyteef.sd3 import checks
from tinyteef.sd3.loader import load_student, load_transformer

# stabilityai/stable-diffusion-3.5-{medium,large}/transformer/config.json, as published
PUBLISHED = {
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm", dual_attention_layers=[]),
}
BILLIONS = {"sd3.5-medium": 2.5, "sd3.5-large": 8.1}  # the model cards' sizes, in billions of parameters
WEIGHTS = os.path.join("student", "transformer", "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("name", PUBLISHED)
def test_sd35_sizes_are_the_published_configs(name):
    """Our presets equal the published configs; built on the meta device (no memory), our MMDiT
    has diffusers' tensors, and their count is the model card's size. The cards count every
    tensor of the checkpoint, the position table included (a buffer: 2.24 B parameters + 0.23 B
    for SD3.5-medium's 384 x 384 x 1536 table = 2.47 B; 8.06 B + 0.09 B for SD3.5-large)."""
    diffusers = oracle("diffusers")
    published = PUBLISHED[name]
    assert asdict(MMDiTConfig(**SIZES[name])) == {**published, "dual_attention_layers": tuple(published[
        "dual_attention_layers"])}
    with torch.device("meta"):
        ours, ref = MMDiT(MMDiTConfig(**SIZES[name])), diffusers.SD3Transformer2DModel(**published)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)
    count = sum(v.numel() for v in ref.state_dict().values())
    assert round(count / 1e9, 1) == BILLIONS[name]


def test_random_init_builds_the_size_asked_for(monkeypatch):
    # --random-init NAME builds SIZES[NAME] for teacher, weak model and student, drawn on the device;
    # here SD3.5-medium's kind of model (qk-norm, MMDiT-X blocks) at a size the CPU runs
    tiny = dict(sample_size=8, num_layers=3, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                joint_attention_dim=12, pooled_projection_dim=10, pos_embed_max_size=12, qk_norm="rms_norm",
                dual_attention_layers=(0, 1))
    monkeypatch.setitem(SIZES, "sd3.5-medium", tiny)
    # (at a resolution its 12 x 12 position table holds: the flags are checked against the size asked for)
    args = train_sd3.parse_args(["--random-init", "sd3.5-medium", "--teacher", "w2sd", "--device", "cpu",
                                 "--resolution", "128"])
    teacher, weak, student = train_sd3.load_models(args, None, torch.device("cpu"))
    assert asdict(teacher.config) == asdict(MMDiTConfig(**tiny))
    assert teacher.transformer_blocks[1].attn2 is not None and teacher.transformer_blocks[2].attn2 is None
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.model.state_dict().values()))
    assert not torch.equal(teacher.proj_out.weight, weak.proj_out.weight)  # the weak model: other draws
    assert student.model.proj_out.weight.requires_grad and not teacher.proj_out.weight.requires_grad


def test_two_fsdp_processes_give_the_losses_of_one_and_resume_exactly(models, data, tmp_path):
    """Two gloo processes, FSDP2: the losses and gradient norms of one process (no FSDP) at the same
    global batch up to float summation order (measured: relative differences ~2e-7; tolerance 1e-5,
    as the DDP test's); stopped at step 2 and resumed (with the frozen models sharded, which only
    moves float32 weights), the run equals the uninterrupted one bit for bit: DCP restores every
    weight and AdamW moment exactly, and the step index is the whole random state. A third run
    reduces each micro-batch's gradient (--fsdp-grad-sync micro-batch): the same losses too."""
    one, whole, parts, each = (tmp_path / n for n in ("one", "whole", "parts", "each"))
    torchrun(1, argv(models, data, one, "w2sd", 4, "--preview-every", "0"))
    torchrun(2, argv(models, data, whole, "w2sd", 4, "--fsdp"))  # with previews: every process samples
    torchrun(2, argv(models, data, parts, "w2sd", 2, "--fsdp", "--preview-every", "0"))
    assert sorted(os.listdir(parts)) == ["cache", "checkpoint", "checkpoint.1", "config.json", "log.jsonl", "student",
                                        "student.1"]
    torchrun(2, argv(models, data, parts, "w2sd", 4, "--fsdp", "--fsdp-frozen", "shard", "--preview-every", "0",
                     "--resume"))
    torchrun(2, argv(models, data, each, "w2sd", 2, "--fsdp", "--fsdp-grad-sync", "micro-batch",
                     "--preview-every", "0"))
    for key in ("loss", "grad_norm"):
        assert torch.allclose(torch.tensor(losses(whole, key)), torch.tensor(losses(one, key)), rtol=1e-5, atol=0)
        assert torch.allclose(torch.tensor(losses(each, key)), torch.tensor(losses(one, key)[:2]), rtol=1e-5, atol=0)
        assert losses(parts, key) == losses(whole, key)  # bit for bit
    assert os.path.isfile(whole / "previews" / "step_000004.png")
    a, b = load_file(os.path.join(whole, WEIGHTS)), load_file(os.path.join(parts, WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the student read from the shards is the trained one: its change from the teacher is the one-process run's
    teacher, ref = load_file(os.path.join(models[0], "transformer", "diffusion_pytorch_model.safetensors")), \
        load_file(os.path.join(one, WEIGHTS))
    for k in ("proj_out.weight", "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.ff.net.2.bias"):
        update, ref_update = a[k] - teacher[k], ref[k] - teacher[k]  # 4 AdamW steps of about lr = 5e-6
        scale = ref_update.abs().max()
        assert scale > 0 and torch.allclose(update, ref_update, rtol=1e-3, atol=1e-3 * scale)
    # ... and diffusers loads it, to our student's output
    diffusers = oracle("diffusers")
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(str(whole / "student" / "transformer")).eval()
    ours, _ = load_transformer(str(whole / "student"))
    assert load_student(str(whole / "student")).w_range == (2.0, 14.0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    tokens, pooled = torch.randn(2, 333, 64, generator=g), torch.randn(2, 48, generator=g)
    with torch.no_grad():
        ref = theirs(hidden_states=x, timestep=1000 * t, encoder_hidden_states=tokens, pooled_projections=pooled).sample
        assert_close_to_reference(ours.eval()(x, t, tokens, pooled), ref, what="student velocity")


def test_fsdp_bad_input(models, data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_sd3.parse_args(argv(models, data, out, "w2sd", 2, "--fsdp-frozen", "shard"))
    assert "--fsdp-frozen and --fsdp-grad-sync apply with --fsdp only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="start it with torchrun --nproc_per_node N"):
        train_sd3.main(argv(models, data, out, "w2sd", 2, "--fsdp"))
    with pytest.raises(SystemExit):
        train_sd3.parse_args(["--random-init", "sd3.5-large", "--teacher", "w2sd", "--data", data])
    assert "--random-init sd3.5-large builds no VAE or text encoders" in capsys.readouterr().err
    # the SD3.5 sizes' position tables, from the published configs: 192 and 384 patches of 16 px a side
    for name in PUBLISHED:
        most = PUBLISHED[name]["pos_embed_max_size"] * 16
        with pytest.raises(SystemExit):
            train_sd3.parse_args(["--random-init", name, "--teacher", "cfg", "--resolution", str(most + 16),
                                  "--device", "cpu"])
        assert f"beyond the position table of --random-init {name}" in capsys.readouterr().err
        assert train_sd3.parse_args(["--random-init", name, "--teacher", "cfg", "--resolution", str(most),
                                     "--device", "cpu"]).resolution == most
    # a run saved with --fsdp (a folder of shards) is continued with --fsdp, and the other way round
    (out / "checkpoint").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no checkpoint.pt to continue \(its checkpoint is from a run with --fsdp"):
        train_sd3.main(argv(models, data, out, "w2sd", 2, "--resume"))
    # ... and the other way round; and a folder of shards that does not read is one line before any work
    # (check_run, which main calls under torchrun)
    for name, extra, expected in (("checkpoint.pt", (), r"no checkpoint to continue \(its checkpoint.pt is from a "
                                   r"run without --fsdp"), ("checkpoint", ("--lr", "1e-4"), r"checkpoint is not a "
                                   r"readable checkpoint \(FileNotFoundError: .*\); delete it and run again")):
        other = tmp_path / name
        other.mkdir()
        (other / name).write_bytes(b"") if name == "checkpoint.pt" else (other / name).mkdir()
        args = train_sd3.parse_args(argv(models, data, other, "w2sd", 2, "--fsdp", "--resume", *extra))
        with pytest.raises(ValueError, match=expected):
            checks.check_run(args, {k: getattr(args, k) for k in train_sd3.RUN_KEYS})


def failing_processes(n, args, folder, file_limit=None):
    """train_sd3.py in n processes, expected to fail each: the last line of each one's stderr. Started
    here, as torchrun would (its variables), not by torchrun, which stops the others as soon as one
    exits, perhaps before they print; a process that waits forever fails the test at the timeout.
    `file_limit`: no file written larger than this many bytes (RLIMIT_FSIZE: a write past it fails
    with EFBIG, as one on a full disk with ENOSPC)."""
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(n)}
    files = [open(folder / f"stderr.{r}", "w+") for r in range(n)]
    def limit():  # in the child: SIGXFSZ ignored, so that a write past the limit fails instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sd3.py"), *args], cwd=ROOT, stdout=subprocess.
                              DEVNULL, stderr=files[r], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              preexec_fn=limit if file_limit else None) for r in range(n)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(code == 1 for code in codes), codes
    lines = []
    for f in files:
        f.seek(0)
        lines.append(f.read().strip().splitlines()[-1])
        f.close()
    return lines


def test_absurd_update_and_damaged_shard_stop_every_fsdp_process(models, data, tmp_path):
    """Under --fsdp the student's weights are shards (DTensors): the norm that step_problem compares
    before and after the update must be the whole student's, the same on every process, so that all
    of them stop together instead of one waiting forever in the next collective. --lr 1e30 stops
    both processes with the same line, whose norm before the update is the teacher's (the student
    starts as its copy), computed here in float64 from the whole weights; half of it would be a
    shard's. A shard damaged on disk stops both at --resume with one line each."""
    out = tmp_path / "absurd"
    lines = failing_processes(2, argv(models, data, out, "cfg", 1, "--fsdp", "--lr", "1e30", "--preview-every", "0"),
                              tmp_path)
    assert lines[0] == lines[1] and lines[0].startswith("error: the update of step 1 (log.jsonl's numbering) took the "
                                                        "norm of the student's weights from ")
    assert lines[0].endswith("stopped before saving it, no checkpoint yet") and not os.path.exists(out / "checkpoint")
    before = float(re.search(r"from (\S+) to", lines[0])[1])
    teacher, _ = load_transformer(models[0])
    norm = torch.cat([p.detach().double().flatten() for p in teacher.parameters()]).norm().item()
    assert abs(before - norm) <= 5e-4 * norm  # printed to 4 digits
    # a run with a checkpoint at step 1. Resumed on a "full disk" (no file over half a shard): both
    # processes stop with one line naming the new version's folder, which is removed; step 1's stays
    out = tmp_path / "damaged"
    torchrun(2, argv(models, data, out, "cfg", 1, "--fsdp", "--preview-every", "0"))
    kept = {f: (out / "checkpoint" / f).read_bytes() for f in os.listdir(out / "checkpoint")}
    shard = min(len(b) for f, b in kept.items() if f.endswith(".distcp"))
    lines = failing_processes(2, argv(models, data, out, "cfg", 2, "--fsdp", "--preview-every", "0", "--resume"),
                              tmp_path, file_limit=shard // 2)
    for line in lines:
        assert line.startswith(f"error: {out / 'checkpoint.2'}: File too large; "), line
        assert "the last one is kept" in line
    assert os.readlink(out / "checkpoint") == "checkpoint.1" and not (out / "checkpoint.2").exists()
    assert {f: (out / "checkpoint" / f).read_bytes() for f in os.listdir(out / "checkpoint")} == kept
    # then one of step 1's shard files cut short
    shard = next(f for f in sorted(os.listdir(out / "checkpoint")) if f.endswith(".distcp"))
    with open(out / "checkpoint" / shard, "r+b") as f:
        f.truncate(os.path.getsize(out / "checkpoint" / shard) // 2)
    lines = failing_processes(2, argv(models, data, out, "cfg", 2, "--fsdp", "--preview-every", "0", "--resume"),
                              tmp_path)
    for line in lines:
        assert line.startswith(f"error: {out / 'checkpoint'} is not a readable checkpoint (")
        assert line.endswith("delete it and run again without --resume: training starts over")


FROZEN_PASSES = """
import sys, torch
from conftest import TINY, random_mmdit
from tinyteef import parallel
from tinyteef.guidance import Student
with parallel.processes(torch.device("cpu")) as (world, rank, device):
    teacher, student = random_mmdit(0).requires_grad_(False), Student(random_mmdit(1), "teefusion")
    parallel.shard(student, (teacher, None), device, shard_frozen=True)
    # FSDP2's record of forwards (private: a torch that renames it gives None, and the test skips)
    order = lambda: getattr(getattr(teacher._get_fsdp_state(), "_comm_ctx", None), "post_forward_order", None)
    record = lambda: None if order() is None else len(order())
    x, t = torch.randn(2, TINY["in_channels"], 8, 8), torch.rand(2)
    tokens, pooled = torch.randn(2, 5, TINY["joint_attention_dim"]), torch.randn(2, TINY["pooled_projection_dim"])
    sizes = []
    for step in range(2):
        for _ in range(3):  # three passes of the frozen teacher per step, as a reflection target's
            with torch.no_grad():
                teacher(x, t, tokens, pooled)
        sizes.append(record())
        parallel.forget_frozen_passes((teacher, None))
        sizes.append(record())
    open(f"{sys.argv[1]}.{rank}", "w").write(str(sizes))
"""


def test_frozen_sharded_nets_forget_their_passes(tmp_path):
    """--fsdp-frozen shard: FSDP2 records every forward of a sharded unit for its backward, and the
    frozen teacher runs none. Three passes of its 4 units (3 blocks, and the root's embedders and
    final layer) leave 12 entries; forget_frozen_passes, called after each step, empties the
    record, so it does not grow over a run."""
    if not hasattr(torch.distributed.fsdp.FSDPModule, "reset_iter_state"):
        pytest.skip("this torch has no FSDPModule.reset_iter_state: the record stays (the code says so)")
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN_PASSES)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / "sizes")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])})
    assert r.returncode == 0, r.stderr[-2000:]
    if "None" in (tmp_path / "sizes.0").read_text():
        pytest.skip("this torch keeps FSDP2's record of forwards under another name")
    for rank in range(2):  # each step: grown by 3 passes x 4 units, then emptied
        assert (tmp_path / f"sizes.{rank}").read_text() == "[12, 0, 12, 0]"
