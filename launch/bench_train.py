"""Speed of one RL update against a PyTorch implementation of the same update, and its MFU.

One update = the old log-probs forward over the rollout batch, then one optimizer step:
forward + backward of the clipped policy loss over the loss-mask tokens, gradient-norm
clipping, Adam. Ours is `searcher_jax.rl.train_step` (reinforce_baseline, one mini-batch of
all rows, micro-batches of `--micro`); the peer is transformers' Qwen2 in PyTorch 2.13 (CPU
build) doing the same arithmetic with torch.optim.Adam. Both on the model shape of the
other benchmarks (Qwen2-shaped, 48M parameters), fp32.

With --length_mix, rows are 64 to --seq tokens long (uniform), as a rollout batch whose few
long rows set its width, and ours also runs with length-aware micro-batches
(rl.length_buckets, rl/length_buckets.py) beside the padded step: the ratio is the speedup,
and the tokens/s count real tokens only. Its ceiling is padded tokens over real tokens.

MFU counts 8 x params x tokens FLOPs (a forward for the old log-probs, then forward and
backward: 2 + 6), without attention, against the measured peak of one 2048^3 matmul.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_model import BENCH_CONFIG, _matmul_flops_per_s
from searcher_jax.model.config import ATTENTION_CHOICES, ModelConfig
from searcher_jax.model.decoder import Decoder
from searcher_jax.rl import train_step
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rl.config import RLConfig


def _batch(rows: int, seq: int, vocab: int, length_mix: bool = False):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, vocab, (rows, seq)).astype(np.int32)
    loss_mask = np.zeros((rows, seq), bool)
    if not length_mix:
        loss_mask[:, seq // 2:] = True  # a prompt, then the sampled response
    else:  # a 32-token prompt, then a response; right padded
        lengths = rng.randint(64, seq + 1, rows)
        lengths[0] = seq
        for row, length in enumerate(lengths):
            loss_mask[row, 32:length] = True
            tokens[row, length:] = 0
    rewards = rng.normal(size=rows).astype(np.float32)
    return tokens, loss_mask, rewards


def ours(args, tokens, loss_mask, rewards, length_buckets: int = 1) -> float:
    config = ModelConfig(**BENCH_CONFIG, dtype="float32", scan_layers=args.scan, remat=False,
                         attention=args.attention)
    rl = RLConfig(samples_per_prompt=4, mini_batch_size=args.rows, micro_batch_size=args.micro,
                  learning_rate=1e-6, total_steps=100, logprob_chunk=args.seq,
                  length_buckets=length_buckets)
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
    state = train_step.make_init_fn(rl, params)(params)
    step = train_step.make_train_step(graphdef, state, rl)
    batch = RolloutBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(loss_mask),
                         rewards=jnp.asarray(rewards))
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.repeats):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.repeats


def torch_peer(args, tokens, loss_mask, rewards) -> float:
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import Qwen2Config, Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    hf = Qwen2Config(vocab_size=BENCH_CONFIG["vocab_size"], hidden_size=BENCH_CONFIG["hidden_size"],
                     intermediate_size=BENCH_CONFIG["intermediate_size"],
                     num_hidden_layers=BENCH_CONFIG["num_layers"],
                     num_attention_heads=BENCH_CONFIG["num_heads"],
                     num_key_value_heads=BENCH_CONFIG["num_kv_heads"], tie_word_embeddings=True,
                     attn_implementation="sdpa")
    model = Qwen2ForCausalLM(hf).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
    tokens_t = torch.tensor(tokens, dtype=torch.long)
    mask = torch.tensor(loss_mask[:, 1:], dtype=torch.float32)
    group = torch.tensor(rewards).view(-1, 4)
    advantages = (group - group.mean(1, keepdim=True)).view(-1, 1)  # reinforce_baseline

    def logprobs(x):
        logits = model(x).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]

    def update():
        with torch.no_grad():
            old = torch.cat([logprobs(tokens_t[i:i + args.micro])
                             for i in range(0, args.rows, args.micro)])
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, args.rows, args.micro):
            rows = slice(i, i + args.micro)
            ratio = torch.exp(logprobs(tokens_t[rows]) - old[rows])
            surrogate = torch.minimum(ratio * advantages[rows],
                                      ratio.clamp(0.8, 1.2) * advantages[rows])
            per_row = (-surrogate * mask[rows]).sum(1) / mask[rows].sum(1)
            (per_row.sum() / args.rows).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    update()
    start = time.perf_counter()
    for _ in range(args.repeats):
        update()
    return (time.perf_counter() - start) / args.repeats


def run(args) -> dict:
    tokens, loss_mask, rewards = _batch(args.rows, args.seq, BENCH_CONFIG["vocab_size"],
                                        args.length_mix)
    # Real tokens: a row's prompt and response (all of it without --length_mix).
    num_tokens = (int(np.where(loss_mask.any(1), loss_mask.shape[1] - np.argmax(
        loss_mask[:, ::-1], axis=1), 0).sum()) if args.length_mix else args.rows * args.seq)
    params = ModelConfig(**BENCH_CONFIG).num_params
    peak = _matmul_flops_per_s(args.repeats)
    seconds = {"ours": ours(args, tokens, loss_mask, rewards)}
    if args.length_mix:
        seconds["ours, length-aware"] = ours(args, tokens, loss_mask, rewards, args.length_buckets)
    if not args.no_peer:
        seconds["pytorch"] = torch_peer(args, tokens, loss_mask, rewards)
    for name, s in seconds.items():
        mfu = 8 * params * num_tokens / s / peak
        print(f"{name:20s}: {s:6.2f} s per update, {num_tokens / s:7.0f} tokens/s, MFU {mfu:.0%} "
              f"(peak {peak / 1e9:.0f} GFLOP/s)")
    if "pytorch" in seconds:
        print(f"ours / pytorch: {seconds['pytorch'] / seconds['ours']:.2f}x")
    if args.length_mix:
        print(f"length-aware / padded: {seconds['ours'] / seconds['ours, length-aware']:.2f}x "
              f"(ceiling, padded over real tokens: {args.rows * args.seq / num_tokens:.2f}x)")
    return {**seconds, "peak_flops": peak, "params": params, "tokens": num_tokens}


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--scan", action="store_true", help="stacked layers under lax.scan")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                        help="ours' attention over whole rows (model/attention.py)")
    parser.add_argument("--length_mix", action="store_true",
                        help="rows of 64 to --seq tokens; adds ours with length-aware micro-batches")
    parser.add_argument("--length_buckets", type=int, default=4,
                        help="widths of the length-aware step (rl.length_buckets)")
    parser.add_argument("--no_peer", action="store_true", help="skip the PyTorch peer")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    add_args(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
