"""Pretrains the tiny base model of the synthetic world.

What it learns from (synthetic/fresh.py), in two phases:

  1. `short_steps` steps on short rows, one single-lookup reading drill each
     (a need, a query, one passage, the fact restated, the answer: about 100
     tokens);
  2. the rest on search-format demonstrations (one per row from position 0, as
     a prompt sits in a rollout; EOS after a whole one; cut at `seq_len` when
     longer) and windows of the packed multi-lookup drills (EOS between them).

Phase 1 is what makes the model read. Copying a value out of a passage needs
attention that finds the value by its content; in 512-token rows the gradient
towards it is spread over hundreds of positions, and a two-layer model trained
on them alone stayed at chance on such lookups for hundreds of steps (README,
"The base model"), while on ~100-token rows it learns them within a few hundred
steps and keeps them when the rows grow. The loss is next-token cross-entropy
on every token but padding.

The result stands in for a pretrained LLM that already follows the search
format and reads retrieved passages (as Qwen2.5-7B-Base does in the paper); it
is a sub-million-parameter model of made-up worlds, not a language model.
"""
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder

_VOCAB_MULTIPLE = 128   # the model's vocab is padded up to this, as Qwen pads its vocab


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The tokenizer's and the model's sizes and the pretraining schedule."""
    vocab_size: int = 4608         # room for every name and year as one token (tokenizer.py)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 8192
    seq_len: int = 512             # a whole demonstration fits (one passage per block)
    batch_size: int = 8
    steps: int = 1300              # both phases
    short_steps: int = 600         # phase 1: single-lookup drills (module docstring)
    short_seq_len: int = 128       # a single-lookup drill fits
    short_batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    demo_fraction: float = 0.5     # share of each batch's rows that are demonstrations
    # The text (synthetic/fresh.py): demonstrations and reading drills about fresh entities.
    num_demos: int = 4000
    num_drills: int = 4000
    num_short_drills: int = 4000
    drill_lookups: int = 4         # reading steps per drill
    texts_per_part: int = 8        # texts per freshly drawn world part
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"PretrainConfig: warmup_steps={self.warmup_steps} must be in "
                             f"[0, steps={self.steps})")
        if not 0 <= self.short_steps < self.steps:
            raise ValueError(f"PretrainConfig: short_steps={self.short_steps} must be in "
                             f"[0, steps={self.steps})")
        if not 0.0 < self.demo_fraction <= 1.0:
            raise ValueError(f"PretrainConfig.demo_fraction={self.demo_fraction} must be in "
                             "(0, 1]")

    def model_config(self, tokenizer_size: int, eos_token_id: int) -> ModelConfig:
        vocab = -(-tokenizer_size // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
        return ModelConfig(
            model_type="qwen2", vocab_size=vocab, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            attention_bias=True, max_position_embeddings=self.max_position_embeddings,
            eos_token_id=eos_token_id, dtype="float32")


@dataclasses.dataclass(frozen=True)
class Rows:
    """Training rows: tokens [N, L] int32 and a loss mask [N, L] (1 on real tokens)."""
    tokens: np.ndarray
    mask: np.ndarray


def demo_rows(token_ids: list[list[int]], eos_id: int, seq_len: int) -> tuple[Rows, int]:
    """One demonstration per row, EOS after a whole one; returns the rows and how many were cut."""
    tokens = np.full((len(token_ids), seq_len), eos_id, np.int32)
    mask = np.zeros((len(token_ids), seq_len), np.int32)
    num_cut = 0
    for row, ids in enumerate(token_ids):
        ids = list(ids) + [eos_id]
        num_cut += len(ids) > seq_len
        ids = ids[:seq_len]
        tokens[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    return Rows(tokens=tokens, mask=mask), num_cut


def passage_stream(token_ids: list[list[int]], eos_id: int) -> np.ndarray:
    """All passages back to back, EOS after each: [total] int32."""
    return np.concatenate([np.asarray(list(ids) + [eos_id], np.int32) for ids in token_ids])


def sample_batch(rng: np.random.Generator, demos: Rows, stream: np.ndarray,
                 config: PretrainConfig) -> Rows:
    """A batch of demonstration rows and windows of the drill stream."""
    num_demos = round(config.batch_size * config.demo_fraction)
    picked = rng.integers(0, demos.tokens.shape[0], num_demos)
    starts = rng.integers(0, stream.shape[0] - config.seq_len, config.batch_size - num_demos)
    windows = stream[starts[:, None] + np.arange(config.seq_len)[None, :]]    # [B - D, L]
    return Rows(tokens=np.concatenate([demos.tokens[picked], windows]),
                mask=np.concatenate([demos.mask[picked], np.ones_like(windows)]))


def masked_next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of tokens[:, 1:] under logits[:, :-1] over mask[:, 1:]."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)                 # [B, L-1, V]
    target_log_probs = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:].astype(jnp.float32)                               # [B, L-1]
    return -jnp.sum(target_log_probs * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.steps, end_value=0.1 * config.learning_rate)
    decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95,
                                   weight_decay=config.weight_decay, mask=decay_matrices))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
    """(params, opt_state, tokens [B, L], mask [B, L]) -> (params, opt_state, loss)."""

    def loss_fn(params, tokens, mask):
        logits = nnx.merge(graphdef, params)(tokens)                        # [B, L, V]
        return masked_next_token_loss(logits, tokens, mask)

    @jax.jit
    def train_step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def pretrain(model: Decoder, demos: Rows, stream: np.ndarray, short: Rows,
             config: PretrainConfig, log: Callable[[str], None] = print) -> list[float]:
    """Trains `model` in place; returns the loss of every step.

    demos: demonstration rows [N, seq_len]; stream: the packed drills [T];
    short: single-lookup drill rows [M, short_seq_len] (phase 1, module docstring).
    """
    if stream.shape[0] <= config.seq_len:
        raise ValueError(f"pretrain: the passage stream has {stream.shape[0]} tokens, fewer "
                         f"than seq_len={config.seq_len}; make the world bigger")
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, optimizer)
    rng = np.random.default_rng(config.seed)
    losses = []
    start = time.time()
    for step in range(config.steps):
        if step < config.short_steps:
            picked = rng.integers(0, short.tokens.shape[0], config.short_batch_size)
            batch = Rows(tokens=short.tokens[picked], mask=short.mask[picked])
        else:
            batch = sample_batch(rng, demos, stream, config)
        params, opt_state, loss = train_step(params, opt_state, batch.tokens, batch.mask)
        losses.append(loss)   # a device array; reading it every step would stall the loop
        if step % 50 == 0 or step == config.steps - 1:
            log(f"pretrain step {step}/{config.steps} loss {float(loss):.3f} "
                f"({time.time() - start:.0f}s)")
    nnx.update(model, params)
    return [float(loss) for loss in losses]
