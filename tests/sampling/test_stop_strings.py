"""Byte-level stop strings: the automaton table against a brute-force search of the bytes."""
import numpy as np
import pytest

from searcher_jax.sampling import stop_strings

TAGS = ("<|end_of_query|>", "</answer>")


def first_stop_by_table(table, token_ids):
    """(token index, stop id, overshoot) of the first stop, walking the table; None if none."""
    state = 0
    for i, token in enumerate(token_ids):
        if table.stop_id[state, token] != stop_strings.NO_STOP:
            return i, int(table.stop_id[state, token]), int(table.overshoot[state, token])
        state = table.next_state[state, token]
    return None


def first_stop_by_search(pieces, stops):
    """The same from the joined bytes: the earliest end of any stop string (longest on a tie)."""
    text = b"".join(pieces)
    ends = []
    for index, stop in enumerate(stops):
        at = text.find(stop.encode())
        if at >= 0:
            ends.append((at + len(stop.encode()), -len(stop), index))
    if not ends:
        return None
    end, _, index = min(ends)
    token_ends = np.cumsum([len(p) for p in pieces])
    token = int(np.searchsorted(token_ends, end))  # first token whose bytes reach `end`
    return token, index, int(token_ends[token] - end)


@pytest.fixture(scope="module")
def qwen_table(qwen_tokenizer):
    pieces = stop_strings.token_bytes(qwen_tokenizer)
    return pieces, stop_strings.build_stop_table(pieces, TAGS, vocab_size=151936)


def test_token_bytes_of_byte_level_bpe(qwen_tokenizer, qwen_table):
    pieces, _ = qwen_table
    text = "so I search.<|end_of_query|>\n\n数据 café"
    ids = qwen_tokenizer.encode(text)
    assert b"".join(pieces[i] for i in ids) == text.encode("utf-8")
    assert pieces[151645] == b"<|im_end|>"


@pytest.mark.parametrize("text, stop, stop_token, overshoot", [
    ("<|end_of_query|>", 0, ">", 0),  # the tag alone
    ("I should look it up.<|end_of_query|>", 0, ">", 0),  # ".<" is one token
    ("keywords here <|end_of_query|>", 0, ">", 0),  # after a space
    ("so I search.<|end_of_query|>\n\nmore", 0, ">\n\n", 2),  # the stop token overshoots
    ("<answer> Paris </answer>", 1, ">", 0),  # " </" is one token
    ("<answer>Paris</answer>\n\nThe end", 1, ">\n\n", 2),
])
def test_qwen_stop_strings(qwen_tokenizer, qwen_table, text, stop, stop_token, overshoot):
    pieces, table = qwen_table
    ids = qwen_tokenizer.encode(text)
    found = first_stop_by_table(table, ids)
    assert found == first_stop_by_search([pieces[i] for i in ids], TAGS)
    index, stop_id, over = found
    assert (stop_id, over) == (stop, overshoot)
    assert qwen_tokenizer.decode([ids[index]]) == stop_token
    kept = b"".join(pieces[i] for i in ids[:index + 1])
    assert kept[:len(kept) - over].endswith(TAGS[stop].encode())


def test_boundary_cases_are_not_token_aligned(qwen_tokenizer):
    # The cases above are the interesting ones only if the tag does not start on a boundary.
    ids = qwen_tokenizer.encode("I should look it up.<|end_of_query|>")
    assert "<|" not in [qwen_tokenizer.decode([i]) for i in ids]
    ids = qwen_tokenizer.encode("<answer> Paris </answer>")
    assert " </" in [qwen_tokenizer.decode([i]) for i in ids]


def test_tag_split_into_single_characters(qwen_tokenizer, qwen_table):
    pieces, table = qwen_table
    ids = [t for char in "ok <|end_of_query|>x" for t in qwen_tokenizer.encode(char)]
    assert len(ids) == len("ok <|end_of_query|>x")
    assert first_stop_by_table(table, ids) == (len("ok <|end_of_query|>") - 1, 0, 0)


@pytest.mark.parametrize("text", ["a partial <|end_of_que", "nearly </answer", "<|end_of_query",
                                  "<|end_of_query]>", "</ answer>"])
def test_prefix_of_a_tag_does_not_stop(qwen_tokenizer, qwen_table, text):
    _, table = qwen_table
    assert first_stop_by_table(table, qwen_tokenizer.encode(text)) is None


def test_random_vocabularies_match_brute_force():
    rng = np.random.RandomState(0)
    alphabet = b"abc"
    pieces = sorted({bytes(rng.choice(list(alphabet), size=n)) for n in range(0, 5)
                     for _ in range(30)})
    stops = ["abca", "bc", "cab", "ccc"]  # overlapping, one a suffix of another's prefix
    table = stop_strings.build_stop_table(pieces, stops, vocab_size=len(pieces) + 3)
    assert table.next_state.shape == (table.num_states, len(pieces) + 3)
    for _ in range(300):
        ids = rng.randint(0, len(pieces), size=rng.randint(1, 12)).tolist()
        assert first_stop_by_table(table, ids) == first_stop_by_search(
            [pieces[i] for i in ids], stops), [pieces[i] for i in ids]
    # Ids past the tokenizer's vocabulary carry no bytes: no move, no stop.
    assert (table.next_state[:, -1] == np.arange(table.num_states)).all()
    assert (table.stop_id[:, -1] == stop_strings.NO_STOP).all()


def test_longest_stop_wins_when_two_end_together():
    pieces = [b"x", b"abc", b"bc"]
    table = stop_strings.build_stop_table(pieces, ["bc", "abc"])
    assert first_stop_by_table(table, [0, 1]) == (1, 1, 0)
    assert first_stop_by_table(table, [0, 2]) == (1, 0, 0)


def test_bad_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="empty stop string"):
        stop_strings.build_stop_table([b"a"], ["a", ""])
    with pytest.raises(ValueError, match="smaller than"):
        stop_strings.build_stop_table([b"a", b"b"], ["a"], vocab_size=1)


def test_table_for_tokenizer_is_cached(qwen_tokenizer):
    first = stop_strings.stop_table_for_tokenizer(qwen_tokenizer, TAGS, vocab_size=151936)
    assert stop_strings.stop_table_for_tokenizer(qwen_tokenizer, TAGS, vocab_size=151936) is first
    assert first.num_states == 25
