"""Shared test helpers.

The reference libraries (diffusers, transformers) are numerical oracles for some tests. Without
them those tests skip, unless TINYTEEF_REQUIRE_ORACLES=1 (set by .ci/run): then they fail, so CI
can never pass by silently skipping the parity tests.
"""

import importlib
import os

import pytest
import torch

from tinyteef.mmdit import MMDiT, MMDiTConfig

REQUIRE_ORACLES = os.environ.get("TINYTEEF_REQUIRE_ORACLES") == "1"


def oracle(module):
    """Import a reference library, or skip (fail when TINYTEEF_REQUIRE_ORACLES=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"{module} is needed as a reference for this test ({e}); pip install -e '.[test]'"
        if REQUIRE_ORACLES:
            pytest.fail(msg)
        pytest.skip(msg)


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
