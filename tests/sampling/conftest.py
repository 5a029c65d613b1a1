"""Tiny random HF models (PyTorch) and their JAX twins, built once per session."""
import numpy as np
import pytest

from tests.hf_reference import VOCAB, make_hf_model

# A right-padded batch of unequal prompt lengths.
PROMPT_LENGTHS = (11, 4, 7)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (directory, torch model): qwen2 (tied), llama (untied, llama3 RoPE), and
    llama_margin (lm_head scaled x40, so greedy argmaxes are far from ties)."""
    out = {}
    for name, kind, scale in (("qwen2", "qwen2", 1.0), ("llama", "llama", 1.0),
                              ("llama_margin", "llama", 40.0)):
        directory = tmp_path_factory.mktemp(f"hf_{name}")
        model = make_hf_model(kind, head_scale=scale)
        model.save_pretrained(directory)
        out[name] = (directory, model)
    return out


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
