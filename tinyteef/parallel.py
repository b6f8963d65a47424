"""Training over several processes: how a step's batch is dealt out, and sharding with FSDP2.

The processes (one per GPU under torchrun) join and leave their group through `processes`. A
step's batch is cut into micro-batches dealt over them (`global_rows`, `micro_batches`),
each with a generator seeded by (seed, step, micro-batch): the numbers of a run do not depend on
how many processes share it. train_sd3.py keeps the gradients in step with DDP, or with `--fsdp`:

DDP holds the whole student on every GPU: float32 weights, gradients and AdamW's two moments,
16 bytes per parameter, 129 GB at SD3.5-large's 8.06 B, more than one GPU holds. FSDP2
(`torch.distributed.fsdp.fully_shard`; Zhao et al. 2023, "PyTorch FSDP") keeps 1/N of each of them
on each of N processes (`shard`). Each transformer block is one unit: its bf16 weights are
all-gathered just before it runs and freed after, and its gradients are reduce-scattered in
float32 as soon as its backward is done. The checkpoint is sharded as well (`save`, `load`:
torch.distributed.checkpoint, DCP; a folder swapped in whole, as the student's), and the first
process reads the student whole from it for diffusers (`read_student`).
"""

import inspect
import json
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .guidance import DistillCFG, Student
from .mmdit import MMDiT

FROZEN = ("whole", "shard")  # --fsdp-frozen: the teacher and the weak model whole on every GPU, or sharded
GRAD_SYNCS = ("step", "micro-batch")  # --fsdp-grad-sync: reduce-scatter once per step, or per micro-batch
RUN_FILE = "run.json"  # the step and the run's config, beside DCP's files in a checkpoint folder


def global_rows(seed, step, batch_size, n):
    """The data rows of optimizer step `step`: positions step*batch .. (step+1)*batch - 1 of the
    stream of epochs, each epoch a permutation of the n rows seeded by (seed, epoch). A function of
    the step alone, so a resumed run and any number of processes see the same batches."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
             for e in {p // n for p in positions}}
    return [perms[p // n][p % n].item() for p in positions]


def micro_batches(no_sync, rows, step, seed, mb, world, rank, device):
    """This process's share of optimizer step `step`, as (data rows, generator, context) per
    micro-batch: the step's `rows` (its whole batch) are cut into micro-batches of `mb` rows
    (gradient accumulation), dealt over the processes (micro-batch m = j * world + rank). Every
    random draw of micro-batch m comes from its own generator, seeded by (seed, step, m), so the
    step index is the whole random state, whatever the number of processes. The context is
    `no_sync()` (DDP's no_sync, or `fsdp_no_sync`) but for the last micro-batch: the gradients are
    reduced once per step."""
    A = len(rows) // mb  # micro-batches per step, all processes
    accum = A // world
    for j in range(accum):
        m = j * world + rank
        g = torch.Generator(device).manual_seed(seed * 1_000_000_007 + step * A + m)
        sync = world == 1 or j == accum - 1
        yield rows[m * mb:(m + 1) * mb], g, nullcontext() if sync else no_sync()


@contextmanager
def processes(device):
    """(world, rank, device) of this process: one, or one per GPU under torchrun (which sets
    WORLD_SIZE, RANK and LOCAL_RANK), joined by NCCL between GPUs or gloo on the CPU (the tests run
    two CPU processes).

    A process of several leaves by os._exit once the group is destroyed, having printed its error
    line if it stopped with one (SystemExit, as train_sd3.py's checks raise it): not by Python's
    shutdown, because a gloo thread may still be freeing the tensors of the last collectives, which
    needs the interpreter, and a thread that asks for it during the shutdown is killed mid-way,
    which aborts the process (exit -6 after the right output; seen in about every second run of
    tests/test_fsdp.py's damaged shard, and now and then after a barrier, whose work holds the
    works before it). Another exception keeps its traceback and Python's shutdown."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world == 1:
        yield world, rank, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield world, rank, device
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(world):
    """Wait for every process (a no-op for one): after rank 0 wrote what the others will read."""
    if world > 1:
        dist.barrier()


def shard(student: Student, frozen, device, shard_frozen=False):
    """FSDP2 over all processes: each transformer block of the student a unit of its own, the rest
    (embedders, final layer, DistillCFG's H) the root unit; `frozen` (teacher, weak model; None
    skipped) sharded the same way if `shard_frozen`, else left whole on every GPU.

    On a GPU the all-gathers move bf16 and the gradients are reduced in float32 over float32 master
    weights (MixedPrecisionPolicy). train_sd3.py keeps its bf16 autocast around it, so the student
    computes as under DDP: autocast would cast each weight to bf16 for its matmul anyway. The
    forward inputs are not cast (cast_forward_inputs=False): FSDP's default would round t and w to
    bf16 before psi (1000 * 6 would enter as 6016). On the CPU (the tests, over gloo) everything
    stays float32. Gradient checkpointing (MMDiT.forward checkpoints each block call) composes:
    FSDP2 gathers a block's weights once for the recomputation and the backward."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    policy = bf16 if device.type == "cuda" else MixedPrecisionPolicy()
    for block in student.model.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(student, mesh=mesh, mp_policy=policy)
    for net in filter(None, frozen) if shard_frozen else ():  # already bf16 on a GPU: gathered as they are
        for block in net.transformer_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)


def wrap(student, device, world, fsdp=False, grad_sync="step"):
    """The student as a training loop calls it, and `no_sync`, the context that holds back the
    gradient reduction of a micro-batch (`micro_batches` puts it around all but the last): DDP and
    its no_sync over several processes; with `fsdp` the student itself (sharded by `shard`) and
    `fsdp_no_sync`, or no context at all when `grad_sync` reduces every micro-batch."""
    if fsdp:
        return student, partial(fsdp_no_sync, student) if grad_sync == "step" else nullcontext
    if world == 1:
        return student, nullcontext
    # The only buffer, the position table (226 MB at SD3-medium size), is a constant: no need to
    # broadcast it before every forward (the flag was renamed in torch 2.14). Gradients as views of
    # DDP's buckets: no second copy of the 8 GB of float32 gradients at SD3-medium size, as long as
    # they stay views: zeroed in place after each update, not set to None (a fresh .grad would
    # accumulate beside the buckets through the no_sync micro-batches).
    buffers = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else "broadcast_buffers": False}
    net = DDP(student, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
              **buffers)
    return net, net.no_sync


def forget_frozen_passes(frozen):
    """After a step, for `frozen` nets sharded by `shard`: FSDP2 records every forward of a sharded
    module for the prefetching of its backward, and forgets the record in that backward; a frozen
    net never runs one, so its record grows by one entry per block and pass (about 80 kB per step
    at batch 128 in micro-batches of 4 with W2SD). FSDPModule.reset_iter_state clears it; where
    torch lacks it (2.11 does; 2.14 has it) the record stays."""
    for net in filter(None, frozen):
        if hasattr(net, "reset_iter_state"):
            net.reset_iter_state()


@contextmanager
def fsdp_no_sync(module):
    """FSDP2's counterpart of DDP's no_sync: the backwards inside add up their gradients without a
    reduce-scatter. FSDP2 keeps that sum unsharded, in float32: 4 bytes per parameter on every GPU
    (32 GB at SD3.5-large), which --fsdp-grad-sync micro-batch saves by reducing each micro-batch."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def save(folder, student, opt, meta):
    """A sharded checkpoint: every process writes its shards of the student and of AdamW's state
    with DCP into a new version FOLDER.N, the first process adds `meta` (step, run config) as
    run.json and makes the link FOLDER point to it in one rename (checkpoint.swap_in, as the
    student's folder), so FOLDER is a whole checkpoint at every instant."""
    first = dist.get_rank() == 0
    new = [checkpoint.next_version(folder) if first else None]
    dist.broadcast_object_list(new)  # one name for all: the first process's listing of the folder
    model_state, optim_state = get_state_dict(student, opt)
    try:  # returns when all is written
        dcp.save({"student": model_state, "optimizer": optim_state}, checkpoint_id=new[0])
    except CheckpointException as e:  # every process is told, once all have tried to write
        if first:  # the half-written version goes (a full disk gets its space back); FOLDER stays the last one
            shutil.rmtree(new[0], ignore_errors=True)
        cause = next(iter(e.failures.values()))[0]
        if isinstance(cause, OSError):  # a full disk, a quota: one line through checks.one_line_errors
            raise OSError(cause.errno, cause.strerror, new[0]) from None
        raise
    if first:
        checkpoint.atomic_write(os.path.join(new[0], RUN_FILE), lambda f: f.write(json.dumps(meta).encode()))
        checkpoint.swap_in(folder, new[0])
    dist.barrier()


def read_meta(folder, hint):
    """The meta (step, run config) of the checkpoint `folder` written by `save`, after a look that
    DCP's index of its shards reads; a ValueError naming the folder, then `hint`, if not."""
    try:
        dcp.FileSystemReader(folder).read_metadata()
        with open(os.path.join(folder, RUN_FILE)) as f:
            return json.load(f)
    except Exception as e:
        raise ValueError(f"{folder} is not a readable checkpoint ({type(e).__name__}: {e}); {hint}") from e


def load(folder, student, opt):
    """Read a checkpoint written by `save` into the sharded student and its optimizer (any number of
    processes: DCP reshards) and return its meta (run.json). A damaged shard raises a ValueError
    that names it, on every process (DCP gathers the failures of all)."""
    meta = read_meta(folder, "delete it and run again without --resume")
    model_state, optim_state = get_state_dict(student, opt)  # the shapes and shards to fill
    state = {"student": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=folder)
    except CheckpointException as e:  # a BaseException: one per failed process, the first is told
        cause = next(iter(e.failures.values()))[0]
        cause = f"{type(cause).__name__}: {' '.join(str(cause).split())}"  # on one line
        raise ValueError(f"{folder} is not a readable checkpoint ({cause}); delete it and run again without --resume: "
                         "training starts over") from None
    set_state_dict(student, opt, model_state_dict=state["student"], optim_state_dict=state["optimizer"])
    return meta


def read_student(folder, student: Student):
    """The student of the checkpoint `folder` (written by `save`), whole, float32 on the CPU, as a
    plain guidance.Student for sd3.loader.save_student. One process reads every shard from the
    files, without collectives: the others go on meanwhile. (Gathering with collectives instead,
    get_model_state_dict(full_state_dict=True), made gloo abort at exit now and then.)"""
    with torch.device("meta"):  # the shapes only, then empty float32 tensors on the CPU for DCP to fill
        model = MMDiT(student.model.config)
        H = DistillCFG(student.model.config.hidden_size) if student.H is not None else None
    whole = Student(model, student.kind, H, student.divisor, student.w_range, student.w_rounding).to_empty(device="cpu")
    dcp.load({"student": whole.state_dict()}, checkpoint_id=folder, no_dist=True)  # in place
    return whole
