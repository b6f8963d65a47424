"""Shared test helpers.

The reference libraries (diffusers, transformers) are numerical oracles for some tests. Without
them those tests skip, unless TINYTEEF_REQUIRE_ORACLES=1 (set by .ci/run): then they fail, so CI
can never pass by silently skipping the parity tests.

Every comparison with a reference library goes through `assert_close_to_reference`, with one
tolerance relative to the reference's own scale (PARITY_RTOL). The session starts by printing the
versions it runs with, so a CI log says which releases a parity failure came from.
"""

import importlib
import importlib.metadata
import os
import platform

import pytest
import torch

from tinyteef.mmdit import MMDiT, MMDiTConfig

REQUIRE_ORACLES = os.environ.get("TINYTEEF_REQUIRE_ORACLES") == "1"
VERSIONED = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "scipy", "numpy")


def pytest_configure(config):
    """One torch thread on a machine of 2 cores, as train_toy.py's command line (toy/fast.py's
    cpu_threads): tests/test_train_toy.py took 19 s on 1 thread; on 2, 12 s idle but 455 s beside
    another test run. OMP_NUM_THREADS, when set, decides instead."""
    from toy.fast import cpu_threads
    cpu_threads()


def pytest_sessionstart(session):
    """Print the Python and library versions first. Not pytest_report_header: `pytest -q` (the
    README's command) hides the header."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    versions = [f"python {platform.python_version()}"]
    for name in VERSIONED:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    reporter.write_line("versions: " + ", ".join(versions))


def oracle(module):
    """Import a reference library, or skip (fail when TINYTEEF_REQUIRE_ORACLES=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"{module} is needed as a reference for this test ({e}); pip install -e '.[test]'"
        if REQUIRE_ORACLES:
            pytest.fail(msg)
        pytest.skip(msg)


# Parity tolerance, relative to the reference's scale: max |ours - ref| <= PARITY_RTOL * max |ref|.
# Why relative, and why 1e-4: the same float32 computation in a different order (another fused
# kernel, another reduction order in a new release of torch, diffusers or transformers) moves
# results by a few float32 ulps of the largest values involved, about 1e-6 of the scale; a fixed
# atol breaks on any new release whose values happen to be larger (CI failed once on 1.1e-5 over
# values of order 1e-1). A real mistake (a wrong constant, a swapped chunk, a missing term) moves
# results by 1e-2 of the scale or more, so 1e-4 keeps two orders of margin on each side.
PARITY_RTOL = 1e-4


def assert_close_to_reference(ours, ref, rtol=PARITY_RTOL, what="output"):
    """Assert max |ours - ref| <= rtol * max |ref|, per tensor, in float64; shapes must match.
    `what` names the tensor in the failure message."""
    ours, ref = torch.as_tensor(ours).detach().double().cpu(), torch.as_tensor(ref).detach().double().cpu()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, (f"{what}: max |ours - ref| = {err:.3g} > {rtol:g} x max |ref| "
                                 f"({scale:.3g}), i.e. {err / max(scale, 1e-300):.3g} of the reference's scale")


# A tiny SD3-shaped config: 2 heads of 8, 3 blocks (the last is context_pre_only), a 12 x 12
# position table that inputs of fewer patches crop.
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
            caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=12)


def random_mmdit(seed=0, std=0.2, **overrides):
    """A tiny MMDiT with every weight drawn from N(0, std^2): a teacher that is a nontrivial
    function of x, t and the text (DiT's zero init would make it output zero)."""
    torch.manual_seed(seed)
    model = MMDiT(MMDiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model
