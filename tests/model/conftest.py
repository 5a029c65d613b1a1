"""Tiny random HF checkpoints (PyTorch), written once per session."""
import numpy as np
import pytest

VOCAB = 128
# Unequal lengths in one right-padded batch; 40 positions go past the Llama
# config's original_max_position_embeddings (16), where llama3 scaling acts.
BATCH_LENGTHS = (40, 25, 7)


def _hf_config(kind: str):
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaConfig(
            **common, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0):
    """A random fp32 HF model whose weights are large enough to matter (std ~0.05)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> (directory, torch model) for qwen2, qwen3 and llama."""
    out = {}
    for kind in ("qwen2", "qwen3", "llama"):
        directory = tmp_path_factory.mktemp(f"hf_{kind}")
        model = make_hf_model(kind)
        model.save_pretrained(directory)
        out[kind] = (directory, model)
    return out


@pytest.fixture(scope="session")
def padded_batch():
    """tokens [3, 40] right-padded with junk ids, lengths [3]."""
    rng = np.random.RandomState(0)
    lengths = np.array(BATCH_LENGTHS, np.int32)
    tokens = rng.randint(0, VOCAB, (len(lengths), lengths.max())).astype(np.int32)
    return tokens, lengths


def torch_logits(model, tokens, lengths):
    import torch
    attention_mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(attention_mask)).logits.numpy()


def max_valid_diff(a, b, lengths):
    return max(float(np.abs(a[i, :n] - b[i, :n]).max()) for i, n in enumerate(lengths))
