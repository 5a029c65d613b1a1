"""Prompts, reference logits and the Qwen tokenizer for the sampler tests (the tiny HF
models are the session fixture `hf_models` in tests/conftest.py)."""
import numpy as np
import pytest

from tests.hf_reference import VOCAB

# A right-padded batch of unequal prompt lengths.
PROMPT_LENGTHS = (11, 4, 7)


@pytest.fixture(scope="session")
def prompts():
    """Three prompts of unequal lengths (lists of ids in [2, VOCAB))."""
    rng = np.random.RandomState(0)
    return [rng.randint(2, VOCAB, n).tolist() for n in PROMPT_LENGTHS]


def hf_logits(model, tokens) -> np.ndarray:
    """transformers' logits [T, V] for one unpadded sequence."""
    import torch
    with torch.no_grad():
        return model(torch.tensor([list(tokens)], dtype=torch.long)).logits[0].numpy()


@pytest.fixture(scope="session")
def qwen_tokenizer(reference_dir):
    from searcher_jax.model import hf_io
    return hf_io.load_tokenizer(reference_dir / "tokenizers" / "qwen2.5")
