"""A padded batch for the model tests (the tiny HF checkpoints are `hf_models`)."""
import numpy as np
import pytest

from tests.hf_reference import VOCAB

# Unequal lengths in one right-padded batch; 40 positions go past the Llama
# config's original_max_position_embeddings (16), where llama3 scaling acts.
BATCH_LENGTHS = (40, 25, 7)


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
