"""Stop strings matched at the byte level, whatever the tokenization.

A tag need not start or end on a token boundary (Qwen2.5 writes `".<"` as one
token and `">\n\n"` as another), so the sampler does not compare token ids.
The stop strings are compiled into one Aho-Corasick automaton over bytes, and
then into a table of the state reached from each state after each token's
bytes: on device a row carries one int and advances it with one gather per
sampled token.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import numpy as np

NO_STOP = -1


@dataclasses.dataclass(frozen=True)
class StopTable:
    """The automaton advanced by whole tokens.

    next_state[s, v]: the state after token v's bytes, starting in state s.
    stop_id[s, v]: the first stop string that those bytes complete, or NO_STOP.
    overshoot[s, v]: how many of token v's bytes lie past that stop string's end.
    """
    stop_strings: tuple[str, ...]
    next_state: np.ndarray  # [S, V] int16 (int32 if S > 32767)
    stop_id: np.ndarray  # [S, V] int8
    overshoot: np.ndarray  # [S, V] int16

    @property
    def num_states(self) -> int:
        return self.next_state.shape[0]


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes stand for themselves; the others (control bytes,
    space, ...) are shifted in order to code points from 256 up.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for, for a HF tokenizer (index = id).

    Byte-level BPE (Qwen, Llama 3, GPT-2) maps its printable symbols back to
    bytes; added tokens stand for their text. Other tokenizers fall back to
    decoding each id alone, which is exact for character- and word-piece
    vocabularies without leading-space markers.
    """
    size = len(tokenizer)
    added = {token_id: content for content, token_id in tokenizer.get_added_vocab().items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    if byte_level:
        to_byte = {char: byte for byte, char in _gpt2_byte_to_unicode().items()}
    out = []
    for token_id, piece in enumerate(pieces):
        if token_id in added:
            out.append(added[token_id].encode("utf-8"))
        elif piece is None:
            out.append(b"")
        elif byte_level:
            try:
                out.append(bytes(to_byte[char] for char in piece))
            except KeyError as e:
                raise ValueError(f"token {token_id} ({piece!r}) of a byte-level tokenizer holds "
                                 f"{e.args[0]!r}, which is not in the GPT-2 byte map") from None
        else:
            out.append(tokenizer.decode([token_id]).encode("utf-8"))
    return out


def _automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Aho-Corasick over bytes: (delta [S, 256] int32, output [S] int32 pattern or NO_STOP).

    output[s] is the pattern that ends at state s: its own, or the one its
    suffix link reaches (a shorter pattern that ends there too).
    """
    children: list[dict[int, int]] = [{}]
    output = [NO_STOP]
    for index, pattern in enumerate(patterns):
        state = 0
        for byte in pattern:
            if byte not in children[state]:
                children.append({})
                output.append(NO_STOP)
                children[state][byte] = len(children) - 1
            state = children[state][byte]
        if output[state] == NO_STOP:
            output[state] = index
    delta = np.zeros((len(children), 256), np.int32)
    fail = [0] * len(children)
    queue = collections.deque()
    for byte in range(256):  # the root: unknown bytes stay at the root
        child = children[0].get(byte)
        if child is not None:
            delta[0, byte] = child
            queue.append(child)
    while queue:  # breadth first, so a state's suffix link is complete before it
        state = queue.popleft()
        if output[state] == NO_STOP:
            output[state] = output[fail[state]]
        for byte in range(256):
            child = children[state].get(byte)
            if child is None:
                delta[state, byte] = delta[fail[state], byte]
            else:
                fail[child] = delta[fail[state], byte]
                delta[state, byte] = child
                queue.append(child)
    return delta, np.asarray(output, np.int32)


def build_stop_table(token_bytes_list: Sequence[bytes], stop_strings: Sequence[str],
                     vocab_size: int | None = None) -> StopTable:
    """Compiles stop strings against a vocabulary given as each id's bytes.

    vocab_size: the model's vocabulary (often padded past the tokenizer's);
    ids without bytes leave the state unchanged and never stop.
    """
    if not stop_strings:
        raise ValueError("build_stop_table needs at least one stop string")
    if any(not s for s in stop_strings):
        raise ValueError(f"empty stop string in {list(stop_strings)}")
    if len(stop_strings) > 127:
        raise ValueError(f"{len(stop_strings)} stop strings; at most 127 fit the int8 stop ids")
    vocab_size = len(token_bytes_list) if vocab_size is None else vocab_size
    if vocab_size < len(token_bytes_list):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{len(token_bytes_list)} tokens")
    delta, output = _automaton([s.encode("utf-8") for s in stop_strings])
    num_states = delta.shape[0]

    lengths = np.zeros(vocab_size, np.int64)
    lengths[:len(token_bytes_list)] = [len(b) for b in token_bytes_list]
    # Tokens sorted longest first, so the ones still consuming bytes at
    # position p are a prefix of that order.
    order = np.argsort(-lengths, kind="stable")
    max_len = int(lengths.max(initial=0))
    padded = np.zeros((vocab_size, max(max_len, 1)), np.uint8)
    for token_id, raw in enumerate(token_bytes_list):
        padded[token_id, :len(raw)] = np.frombuffer(raw, np.uint8)
    padded, sorted_lengths = padded[order], lengths[order]
    active_counts = np.searchsorted(-sorted_lengths, -np.arange(1, max_len + 1), side="right")

    state = np.broadcast_to(np.arange(num_states, dtype=np.int32)[:, None],
                            (num_states, vocab_size)).copy()  # [S, V] in sorted order
    stop_id = np.full((num_states, vocab_size), NO_STOP, np.int32)
    overshoot = np.zeros((num_states, vocab_size), np.int32)
    for p in range(max_len):
        n = active_counts[p]
        current = delta[state[:, :n], padded[None, :n, p]]  # [S, n]
        state[:, :n] = current
        completed = (output[current] != NO_STOP) & (stop_id[:, :n] == NO_STOP)
        stop_id[:, :n] = np.where(completed, output[current], stop_id[:, :n])
        overshoot[:, :n] = np.where(completed, sorted_lengths[None, :n] - p - 1,
                                    overshoot[:, :n])

    inverse = np.empty_like(order)
    inverse[order] = np.arange(vocab_size)
    state_dtype = np.int16 if num_states <= np.iinfo(np.int16).max else np.int32
    return StopTable(stop_strings=tuple(stop_strings),
                     next_state=state[:, inverse].astype(state_dtype),
                     stop_id=stop_id[:, inverse].astype(np.int8),
                     overshoot=overshoot[:, inverse].astype(np.int16))


@functools.lru_cache(maxsize=8)
def _cached_table(token_bytes_tuple: tuple[bytes, ...], stop_strings: tuple[str, ...],
                  vocab_size: int) -> StopTable:
    return build_stop_table(token_bytes_tuple, stop_strings, vocab_size)


def stop_table_for_tokenizer(tokenizer, stop_strings: Sequence[str],
                             vocab_size: int | None = None) -> StopTable:
    """build_stop_table for a HF tokenizer, cached in memory per tokenizer and stop strings."""
    raw = tuple(token_bytes(tokenizer))
    vocab_size = len(raw) if vocab_size is None else vocab_size
    return _cached_table(raw, tuple(stop_strings), vocab_size)
