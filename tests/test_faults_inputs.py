"""Hostile-input faults: each must end in a ValueError (or a clear ImportError) naming the culprit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mopo_jax import models as M


# --- 1. generation --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    cfg = M.get_preset("tiny", max_seq_len=32)
    return cfg, M.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("n", [0, -3])
def test_generate_rejects_nonpositive_max_new_tokens(tiny_model, n):
    cfg, params = tiny_model
    toks, mask = M.left_pad([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.generate(cfg, params, toks, n, prompt_mask=mask)


def test_generate_rejects_prompt_beyond_context(tiny_model):
    cfg, params = tiny_model
    toks, mask = M.left_pad([list(range(1, 31))])
    with pytest.raises(ValueError, match=r"30.*max_new_tokens 5.*max_seq_len 32"):
        M.generate(cfg, params, toks, 5, prompt_mask=mask)
    # padding does not count: a short prompt padded wide still fits
    toks, mask = M.left_pad([[1, 2, 3]], length=30)
    out = M.generate(cfg, params, toks, 2, prompt_mask=mask)
    assert out.tokens.shape == (1, 2)


def test_generate_cli_rejects_max_new_tokens_before_loading(monkeypatch):
    from mopo_jax.models import generation

    def boom(*a, **k):
        raise AssertionError("weights loaded before the argument check")
    monkeypatch.setattr(generation, "_load_for_cli", boom)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.generate_cli("smollm2-135m", "hi", max_new_tokens=0)
