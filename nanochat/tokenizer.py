"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

The split pattern is GPT-4's with numbers chunked by up to 2 digits (not 3), which wastes
fewer merges on number chunks at small vocabulary sizes. Four special tokens sit inside the
vocabulary; the first one marks the beginning of every document (BOS).
"""
import os
import pickle
from pathlib import Path

import rustbpe
import tiktoken
import torch

from nanochat.cache import PREPARE_COMMAND, tokenizer_dir

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
ENCODE_THREADS = min(8, os.cpu_count() or 1)


class TokenizerFileError(RuntimeError):
    """A tokenizer file is missing, truncated or not what we wrote."""


def _rebuild_hint() -> str:
    return f"Rebuild it with `{PREPARE_COMMAND} --force` (same --profile/--dataset as before)."


def train_bpe(texts, vocab_size: int) -> dict:
    """Train merges on an iterator of strings -> mergeable ranks {token bytes: id}.

    vocab_size counts the special tokens too; they take the ids after the merges."""
    num_merged = vocab_size - len(SPECIAL_TOKENS)
    if num_merged < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, vocab_size=num_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) < num_merged:  # the text ran out of pairs to merge
        raise ValueError(f"The training text is too small for a {vocab_size}-token vocabulary: it yields only "
                         f"{len(ranks) + len(SPECIAL_TOKENS)} tokens. Use a larger data set.")
    return ranks


def make_encoding(ranks: dict) -> tiktoken.Encoding:
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="autoresearch", pat_str=SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


def token_byte_lengths(enc: tiktoken.Encoding) -> torch.Tensor:
    """Bytes each token id decodes to; 0 for special tokens so the metric skips them."""
    lengths = [0 if enc.is_special_token(i) else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int32)


def save_tokenizer(ranks: dict, directory: Path) -> None:
    """Write the merges and the byte-length table, each atomically (no half-written files)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {"pattern": SPLIT_PATTERN, "mergeable_ranks": ranks,
             "special_tokens": SPECIAL_TOKENS}
    tmp = directory / (TOKENIZER_FILE + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
    os.replace(tmp, directory / TOKENIZER_FILE)
    tmp = directory / (TOKEN_BYTES_FILE + ".tmp")
    torch.save(token_byte_lengths(make_encoding(ranks)), tmp)
    os.replace(tmp, directory / TOKEN_BYTES_FILE)


def _load_state(path: Path) -> dict:
    if not path.exists():
        raise TokenizerFileError(f"No tokenizer at {path}. Train one with `{PREPARE_COMMAND}`.")
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
        ranks = state["mergeable_ranks"]
        assert state["pattern"] == SPLIT_PATTERN and state["special_tokens"] == SPECIAL_TOKENS
        assert isinstance(ranks, dict) and len(ranks) >= 256
    except Exception as e:
        raise TokenizerFileError(f"Tokenizer file {path} is corrupt or truncated ({type(e).__name__}). "
                                 + _rebuild_hint()) from e
    return state


def _load_token_bytes(path: Path, vocab_size: int) -> torch.Tensor:
    if not path.exists():
        raise TokenizerFileError(f"No token byte table at {path}. " + _rebuild_hint())
    try:
        table = torch.load(path, weights_only=True)
        assert isinstance(table, torch.Tensor) and table.shape == (vocab_size,)
    except Exception as e:
        raise TokenizerFileError(f"Token byte table {path} is corrupt or truncated ({type(e).__name__}). "
                                 + _rebuild_hint()) from e
    return table


class Tokenizer:
    """The upstream tokenizer interface over a tiktoken Encoding."""

    def __init__(self, enc: tiktoken.Encoding, token_bytes: torch.Tensor):
        self.enc = enc
        self.token_bytes = token_bytes  # int32 (vocab_size,), on the CPU
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory=None) -> "Tokenizer":
        directory = Path(directory) if directory else tokenizer_dir()
        state = _load_state(directory / TOKENIZER_FILE)
        enc = make_encoding(state["mergeable_ranks"])
        return cls(enc, _load_token_bytes(directory / TOKEN_BYTES_FILE, enc.n_vocab))

    @classmethod
    def from_merges_file(cls, path) -> "Tokenizer":
        """From the merges file alone, its byte-length table computed from it (as prepare wrote
        it): the harness's evaluation reads one file, whose content the worker checked."""
        enc = make_encoding(_load_state(Path(path))["mergeable_ranks"])
        return cls(enc, token_byte_lengths(enc))

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads: int = ENCODE_THREADS):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists).

        Special-token text in the input is encoded as ordinary text, never as a special token.
        prepend: a token id or special-token string put in front of each sequence.
        """
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend is not None:
            for ids in batch:
                ids.insert(0, prepend)
        return batch

    def decode(self, ids) -> str:
        return self.enc.decode(ids)
