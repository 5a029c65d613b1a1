"""Tiny random transformers (PyTorch) models: the reference our JAX code is checked against."""
VOCAB = 128


def hf_config(kind: str):
    """qwen2 (tied), qwen3 (untied, head_dim 32) or llama (untied, llama3 RoPE scaling whose
    original_max_position_embeddings of 16 is short enough for tests to go past it)."""
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
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


def make_hf_model(kind: str, seed: int = 0, head_scale: float = 1.0):
    """A random fp32 model with weights large enough to matter (std ~0.05 added);
    head_scale multiplies an untied lm_head (large logit margins, no greedy ties)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if head_scale != 1.0:
            model.lm_head.weight.mul_(head_scale)
    return model
