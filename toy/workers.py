"""Independent work of the toy in one process per GPU: the seeds of `train_toy.py --seeds`
(toy/seeds.py), and the student stages of one seed (toy/students.py's `spread`), which all read the
same trained teacher and none another's result. Each process is a `train_toy.py` of its own with
the coordinator's flags and sees one GPU (CUDA_VISIBLE_DEVICES); with more processes than GPUs they
take turns, so one GPU runs them one after the other. On the CPU the processes share the cores."""

import os
import subprocess
import sys
import time


def count(args):
    """How many processes run at once: --workers, or one per visible GPU (1 on the CPU)."""
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"error: --workers must be at least 1, got {args.workers}")
    return args.workers or (cuda_count() if args.device.startswith("cuda") else 1)


def cuda_count():
    """The number of GPUs this process sees."""
    import torch  # here only: the merge of the seeds' reports needs no torch
    return torch.cuda.device_count()


def flags(args, mode):
    """The flags a child process repeats from the coordinator's: the same dataset, preset, compile
    mode and divisor; a child sees its one GPU as "cuda"."""
    gpu = args.device.startswith("cuda")
    out = ["--data", args.data, "--preset", args.preset, "--compile", mode, "--device", "cuda" if gpu else args.device]
    out += ["--data-root", os.path.abspath(args.data_root)] if args.data_root else []
    out += ["--teefusion-divisor", str(args.teefusion_divisor)] if args.teefusion_divisor is not None else []
    return out


def command(script, argv):
    """A train_toy.py invocation (`script`) in a new process of this Python."""
    return [sys.executable, script, *argv]


def slots(device_type, workers):
    """One environment per worker: on a GPU, each worker sees one GPU of those visible (round robin,
    so more workers than GPUs share them); on the CPU, each gets an equal share of the cores."""
    if device_type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(cuda_count())]
        return [{"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} for i in range(workers)]
    threads = str(max((os.cpu_count() or 1) // workers, 1))
    return [{"OMP_NUM_THREADS": threads} for _ in range(workers)]


def run_all(commands, slots):
    """Run the commands, at most one per slot at a time, each with its slot's environment variables
    (CUDA_VISIBLE_DEVICES on a GPU); wait for all. Raises RuntimeError naming the first that failed
    (the others still finish, so that a rerun resumes from what they did)."""
    waiting, running, failed = list(commands), {}, []
    free = list(slots)
    while waiting or running:
        while waiting and free:
            slot, cmd = free.pop(0), waiting.pop(0)
            running[subprocess.Popen(cmd, env={**os.environ, **slot})] = (slot, cmd)
        for proc in list(running):
            if proc.poll() is not None:
                slot, cmd = running.pop(proc)
                free.append(slot)
                if proc.returncode:
                    failed.append(f"{' '.join(cmd)} (exit status {proc.returncode})")
        time.sleep(0.05)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(commands)} processes failed; the first: {failed[0]}. Run the "
                           "same command again to resume them")
