"""The toy's fast path on a GPU: the same computation as the eager one, with fewer, larger kernels.

- `compiled(module, mode)`: torch.compile of the whole module, kept beside the plain module (which
  stays what is saved, copied and loaded: no `_orig_mod.` keys, and a deepcopy never calls into the
  original's compiled code). "fuse" lets Inductor fuse the elementwise work (adaLN modulation,
  gates, residual adds, GELU, LayerNorm) between the matrix products; "graphs" also records each
  fixed-shape call as a CUDA graph and replays it, so the ~200 kernels of a toy forward pass are
  launched by one call instead of one Python dispatch each (torch.compile's "reduce-overhead").
  A recorded call's outputs (a training step's gradients among them) live in memory that the next
  replay writes over, so each optimizer steps right after its own backward (toy/students.py).
- `adamw(params, lr, fused)`: AdamW with its update fused into one kernel per parameter group.

Both change results by float rounding only (tests/test_toy_fast.py compares them with the eager
path); tests/bench_toy.py measures what each gives.
"""

import os

import torch

COMPILE_MODES = ("off", "fuse", "graphs")


def compiled(module, mode):
    """`module` itself (mode "off"), or a compiled callable that shares its parameters."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return module
    # static shapes: one compiled graph per batch size and grad mode, reused on every step; the toy
    # calls each net with a few batch sizes (B, 2B for CFG), past dynamo's default of 8 over all nets
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(module, dynamic=False, mode="reduce-overhead" if mode == "graphs" else None)


def adamw(params, lr, fused=False):
    """The toy's optimizer (no weight decay); `fused`: one kernel per step instead of a few per tensor."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def cpu_threads():
    """One torch thread on a machine of 2 cores or fewer, unless OMP_NUM_THREADS says otherwise: the
    toy's ops are small, each waits for both threads, and any other busy process then stalls the run
    (smoke preset, 2026-12-01, this project's 2-core machine: 27 s on 1 thread; on 2, 19 s idle but
    34 to 130 s beside a test run). train_toy.py's command line and the test suite call it."""
    if (os.cpu_count() or 1) <= 2 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
