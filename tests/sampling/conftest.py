"""Tiny random HF models (PyTorch) and their JAX twins, built once per session."""
import numpy as np
import pytest

VOCAB = 128
# A right-padded batch of unequal prompt lengths.
PROMPT_LENGTHS = (11, 4, 7)


def _hf_config(kind: str):
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "llama":
        return transformers.LlamaConfig(
            **common, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0, head_scale: float = 1.0):
    """A random fp32 HF model; head_scale multiplies an untied lm_head (large logit margins)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if head_scale != 1.0:
            model.lm_head.weight.mul_(head_scale)
    return model


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
