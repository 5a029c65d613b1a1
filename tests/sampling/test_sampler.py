"""The sampler against transformers, across pauses and resumes, sharded, and compiled rarely."""
import jax
import numpy as np
import pytest
from tests.sampling.conftest import VOCAB, hf_logits

from searcher_jax.model import hf_io, sharding
from searcher_jax.sampling import sampler as sampling
from searcher_jax.sampling import select, state as state_lib, stop_strings

NO_EOS = [-1]


def load(hf_models, name, scan_layers=False, mesh=None, copy_scan_layers=None):
    """The sampling copy of a model loaded in the training layout (FSDP) on the same mesh."""
    model = hf_io.load_pretrained(hf_models[name][0], dtype="float32", scan_layers=scan_layers,
                                  mesh=mesh)
    return sampling.sampling_copy(model, mesh, scan_layers=copy_scan_layers)


def make_sampler(model, max_len=64, segment_len=8, stop_table=None, mesh=None,
                 max_extend_chunk=512, min_extend_bucket=16, min_attend_bucket=128,
                 **select_kwargs):
    config = sampling.SamplerConfig(max_len=max_len, segment_len=segment_len,
                                    select=select.SelectConfig(**select_kwargs),
                                    max_extend_chunk=max_extend_chunk,
                                    min_extend_bucket=min_extend_bucket,
                                    min_attend_bucket=min_attend_bucket, record_logits=True)
    return sampling.Sampler(model, config, stop_table, mesh)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# "capped": extend chunks of at most 8 tokens (the 11-token prompt takes two), the
# whole 64-slot buffer attended. "windowed": a 256-slot buffer of which decode
# attends a cut-out window of 24 or 48 slots, and a 37-token document that goes
# in as two chunks (32 + 8) instead of one padded to 64. "restacked": the
# sampling copy takes the other layer layout than the trained model.
LAYOUTS = {"capped": {"max_extend_chunk": 8},
           "windowed": {"max_len": 256, "min_attend_bucket": 16, "min_extend_bucket": 4},
           "restacked": {"max_extend_chunk": 8}}


@pytest.mark.parametrize("name, scan_layers, layout", [("qwen2", False, "capped"),
                                                       ("llama", True, "capped"),
                                                       ("qwen2", False, "windowed"),
                                                       ("llama", True, "restacked"),
                                                       ("qwen2", False, "restacked")])
def test_logits_match_transformers_through_pause_extend_resume(hf_models, prompts, name,
                                                               scan_layers, layout):
    hf_model = hf_models[name][1]
    copy_scan = (not scan_layers) if layout == "restacked" else None
    model = load(hf_models, name, scan_layers, copy_scan_layers=copy_scan)
    assert model.config.scan_layers == (scan_layers if copy_scan is None else copy_scan)
    smp = make_sampler(model, temperature=1.0, top_p=0.9, **LAYOUTS[layout])
    state = smp.init(len(prompts), NO_EOS, jax.random.key(0))
    state = smp.extend(state, prompts)
    texts = [list(p) for p in prompts]
    rng = np.random.RandomState(1)
    doc_lengths = (5, 0, 37) if layout == "windowed" else (5, 0, 13)
    # Segment, then documents of unequal lengths (none for row 1), then another segment.
    for docs in (None, [rng.randint(2, VOCAB, n).tolist() for n in doc_lengths]):
        if docs is not None:
            state = smp.extend(state, docs)
            texts = [t + d for t, d in zip(texts, docs)]
        state, segment = smp.decode(state)
        new = smp.new_tokens(state, segment, range(len(prompts)))
        for b, text in enumerate(texts):
            tokens, logprobs = new[b]
            n = len(tokens)
            assert n == smp.config.segment_len and segment.status[b] == state_lib.RUNNING
            reference = hf_logits(hf_model, text + tokens.tolist())[len(text) - 1:len(text) - 1 + n]
            ours = segment.logits[b, :n]
            np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
            # Sampled log-probs: log-softmax of the (temperature 1) logits at the tokens.
            np.testing.assert_allclose(logprobs, log_softmax(ours)[np.arange(n), tokens],
                                       atol=1e-5, rtol=0)
            texts[b] = text + tokens.tolist()
    # The buffer holds exactly the text; sampled tokens carry log-probs, inserted ones 0.
    buffer = np.asarray(state.tokens)
    for b, text in enumerate(texts):
        assert buffer[b, :len(text)].tolist() == text
    assert np.asarray(state.logprobs)[0, :len(prompts[0])].tolist() == [0.0] * len(prompts[0])


def test_greedy_tokens_equal_transformers_generate(hf_models, prompts):
    import torch
    hf_model = hf_models["llama_margin"][1]
    smp = make_sampler(load(hf_models, "llama_margin"), segment_len=12, greedy=True)
    state = smp.extend(smp.init(len(prompts), NO_EOS, jax.random.key(0)), prompts)
    state, segment = smp.decode(state)
    new = smp.new_tokens(state, segment, range(len(prompts)))
    # The margins are large, so float rounding cannot flip a greedy choice.
    top2 = np.sort(segment.logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-2
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert new[b][0].tolist() == out[0, len(prompt):].tolist()


def first_stop(pieces, stop):
    """(token index, overshoot) of stop's first end in the joined pieces, or None."""
    text = b"".join(pieces)
    at = text.find(stop)
    if at < 0:
        return None
    ends = np.cumsum([len(p) for p in pieces])
    token = int(np.searchsorted(ends, at + len(stop)))
    return token, int(ends[token] - at - len(stop))


def test_pause_at_stop_string_finish_at_eos_and_resume(hf_models, prompts):
    model = load(hf_models, "qwen2")
    reference = make_sampler(model, segment_len=10, greedy=True)
    state = reference.extend(reference.init(len(prompts), NO_EOS, jax.random.key(0)), prompts)
    state, segment = reference.decode(state)
    free = {b: t.tolist() for b, (t, _) in reference.new_tokens(state, segment, range(3)).items()}

    # A vocabulary whose token i reads "<i>"; the stop string ends inside one of row 0's
    # sampled tokens (the first whose pair with its predecessor is new), which overshoots it.
    pieces = [f"<{i}>".encode() for i in range(VOCAB)]
    for k in range(1, 10):
        stop = pieces[free[0][k - 1]] + pieces[free[0][k]][:2]
        if first_stop([pieces[t] for t in free[0]], stop)[0] == k:
            break
    else:
        pytest.fail(f"row 0 repeats one pair of tokens throughout: {free[0]}")
    table = stop_strings.build_stop_table(pieces, [stop.decode()])
    expected = {b: first_stop([pieces[t] for t in free[b]], stop) for b in range(3)}
    assert expected[0] == (k, len(pieces[free[0][k]]) - 2) and expected[0][1] > 0
    smp = make_sampler(model, segment_len=10, stop_table=table, greedy=True)
    eos = np.array([[-1], [-1], [free[2][5]]])  # row 2 ends at its 6th token (if not earlier)
    state = smp.extend(smp.init(3, eos, jax.random.key(0)), prompts)
    state, segment = smp.decode(state)
    new = smp.new_tokens(state, segment, range(3))
    for b in range(3):
        eos_at = free[b].index(eos[b, 0]) if eos[b, 0] in free[b] else None
        stop_at = None if expected[b] is None else expected[b][0]
        ends = [i for i in (stop_at, eos_at) if i is not None]
        end = min(ends) if ends else None
        if end is None:
            assert segment.status[b] == state_lib.RUNNING
        elif end == eos_at:
            assert segment.status[b] == state_lib.FINISHED
        else:
            assert segment.status[b] == state_lib.PAUSED
            assert (segment.stop_id[b], segment.overshoot[b]) == (0, expected[b][1])
        assert new[b][0].tolist() == free[b][:None if end is None else end + 1], (b, free, stop, segment)
    assert 0 in segment.paused_rows and segment.status[2] == state_lib.FINISHED

    # Resume only the paused row: the others are left alone.
    docs = [[7, 8, 9] if b in segment.paused_rows else [] for b in range(3)]
    before = segment.cursor.copy()
    state = smp.finish(smp.extend(state, docs), [1])
    state, again = smp.decode(state)
    for b in range(3):
        if b in segment.paused_rows:
            assert again.segment_start[b] == before[b] + 3 and again.cursor[b] > before[b] + 3
        else:
            assert again.cursor[b] == before[b]
    assert again.status[1] == state_lib.FINISHED and again.status[2] == state_lib.FINISHED


def test_sharded_sampling_equals_one_device(hf_models, prompts):
    assert len(jax.devices()) == 8
    batch = prompts + [prompts[0][::-1]]
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9)
    outputs = []
    for mesh in (None, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        model = load(hf_models, "qwen2", mesh=mesh)
        smp = make_sampler(model, mesh=mesh, **kwargs)
        state = smp.extend(smp.init(len(batch), NO_EOS, jax.random.key(3)), batch)
        state, segment = smp.decode(state)
        outputs.append(smp.new_tokens(state, segment, range(len(batch))))
        if mesh is not None:
            # The sampling copy is split over tensor only (vocab), never over fsdp.
            assert tuple(model.embed[...].sharding.spec)[:1] == ("tensor",)
            assert "fsdp" not in str(model.embed[...].sharding.spec)
            cache_spec = jax.tree.leaves(state.cache)[0].sharding.spec
            assert cache_spec[0] == ("data", "fsdp") and cache_spec[1] == "tensor"
            assert state.tokens.sharding.spec[0] == ("data", "fsdp")
    for b in range(len(batch)):
        assert outputs[0][b][0].tolist() == outputs[1][b][0].tolist()
        np.testing.assert_allclose(outputs[0][b][1], outputs[1][b][1], atol=1e-5, rtol=0)


def test_rollout_compiles_a_fixed_small_number_of_programs(hf_models, prompts):
    smp = make_sampler(load(hf_models, "qwen2"), max_len=256, segment_len=6, temperature=1.0)
    rng = np.random.RandomState(0)

    def rollout(doc_lengths):
        state = smp.extend(smp.init(3, NO_EOS, jax.random.key(0)), prompts)
        for lengths in doc_lengths:
            state, segment = smp.decode(state)
            smp.new_tokens(state, segment, segment.paused_rows)
            state = smp.extend(state, [rng.randint(2, VOCAB, n).tolist() for n in lengths])
        return smp.decode(state)[1]

    lengths = rng.randint(0, 40, (6, 3))
    segment = rollout(lengths)
    assert len({int(n) for n in lengths.ravel()}) > 10  # many distinct chunk lengths...
    assert segment.cursor.max() > 128  # ...and the rows cross an attention bucket
    # Extend: chunk buckets {16, 32, 64} x attention buckets {128, 256} at most;
    # decode: attention buckets {128, 192, 256}; init and the token window: one each.
    assert smp.num_compiled <= 11, smp.traces
    compiled = smp.num_compiled
    rollout(lengths)
    assert smp.num_compiled == compiled  # the same shapes never compile again


def test_top_k_top_p_and_row_independence(hf_models, prompts):
    model = load(hf_models, "qwen2")
    top3 = make_sampler(model, temperature=1.0, top_k=3)
    state = top3.extend(top3.init(3, NO_EOS, jax.random.key(0)), prompts)
    state, segment = top3.decode(state)
    new = top3.new_tokens(state, segment, range(3))
    for b in range(3):
        allowed = np.argsort(segment.logits[b], axis=-1)[:, -3:]
        assert all(t in allowed[i] for i, t in enumerate(new[b][0]))

    nucleus = make_sampler(model, temperature=1.0, top_p=1e-6)  # only the most likely token
    state = nucleus.extend(nucleus.init(3, NO_EOS, jax.random.key(0)), prompts)
    state, segment = nucleus.decode(state)
    new = nucleus.new_tokens(state, segment, range(3))
    for b in range(3):
        assert new[b][0].tolist() == segment.logits[b].argmax(-1).tolist()

    # Row 0 draws the same tokens whatever its neighbours, and another row id draws others.
    smp = make_sampler(model, temperature=1.0)
    draws = []
    for batch, row_ids in ((prompts, [0, 1, 2]), ([prompts[0], prompts[2], prompts[1]], [0, 5, 6]),
                           (prompts, [9, 1, 2])):
        state = smp.extend(smp.init(3, NO_EOS, jax.random.key(0), row_ids), batch)
        state, segment = smp.decode(state)
        draws.append(smp.new_tokens(state, segment, [0])[0][0].tolist())
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_rows_that_fill_the_buffer_are_truncated(hf_models, prompts):
    smp = make_sampler(load(hf_models, "qwen2"), max_len=16, segment_len=8, greedy=True)
    state = smp.extend(smp.init(3, NO_EOS, jax.random.key(0)), prompts)  # lengths 11, 4, 7
    state, segment = smp.decode(state)
    assert segment.cursor.tolist() == [16, 12, 15]
    assert segment.status.tolist() == [state_lib.TRUNCATED, state_lib.RUNNING, state_lib.RUNNING]
    state = smp.extend(state, [[], [3] * 10, []])  # does not fit: kept up to the buffer's end
    assert np.asarray(state.status).tolist()[1] == state_lib.TRUNCATED
    assert np.asarray(state.tokens)[1, 12:].tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="extend got 2 rows"):
        smp.extend(state, [[1], [2]])


def test_batch_invariant_attends_whole_key_blocks_of_any_window(hf_models):
    """max_len 704 (11 blocks of 64 keys): a row at 510 tokens decodes in a three-quarter
    window of the capped 704 bucket, 528 slots, which is not whole blocks; it is rounded up
    to 576, and the greedy tokens are the default sampler's."""
    model, prompt = load(hf_models, "qwen2"), [[2 + i % (VOCAB - 2) for i in range(510)]]
    tokens = []
    for invariant in (False, True):
        smp = sampling.Sampler(model, sampling.SamplerConfig(
            max_len=704, segment_len=64, batch_invariant=invariant,
            select=select.SelectConfig(greedy=True)))
        state = smp.extend(smp.init(1, NO_EOS, jax.random.key(0)), prompt)
        state, segment = smp.decode(state, steps=16)
        tokens.append(smp.new_tokens(state, segment, [0])[0][0].tolist())
    assert len(tokens[1]) == 16 and tokens[1] == tokens[0]


def test_batch_invariant_needs_key_blocks_that_divide_the_buffer():
    assert sampling.SamplerConfig(max_len=768, batch_invariant=True).key_block == 64
    assert sampling.SamplerConfig(max_len=768).key_block == 0
    with pytest.raises(ValueError, match=r"max_len \(700\) a multiple"):
        sampling.SamplerConfig(max_len=700, batch_invariant=True)
    with pytest.raises(ValueError, match="invariant_chunk"):
        sampling.SamplerConfig(max_len=768, invariant_chunk=0)


@pytest.mark.parametrize("remaining", [1, 15, 16, 17, 40, 65, 100, 129, 300, 511, 512, 600, 1300])
def test_extend_chunks_cover_the_tokens_with_little_padding(remaining):
    chunks, left = [], remaining
    while left > 0:
        chunks.append(sampling.extend_chunk(left, 16, 512))
        left -= chunks[-1]
    assert all(c in (16, 32, 64, 128, 256, 512) for c in chunks)  # the compiled shapes
    one_bucket = sum(sampling.power_of_two_bucket(min(left, 512), 16, 512)
                     for left in range(remaining, 0, -512))
    assert sum(chunks) <= one_bucket  # never pads more than power-of-two buckets
    assert sum(chunks) - remaining < max(64, remaining // 4)


def test_attend_buckets_hold_the_reach_and_waste_at_most_a_third():
    sizes = {sampling.attend_bucket(n, 128, 8192) for n in range(1, 8193)}
    assert sorted(sizes) == [128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                             8192]
    for n in range(129, 8193, 7):
        bucket = sampling.attend_bucket(n, 128, 8192)
        assert n <= bucket < 1.5 * n
    assert sampling.attend_bucket(1476, 128, 1476) == 1476  # capped at the buffer
