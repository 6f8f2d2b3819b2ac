"""The tokenizer: rustbpe training, tiktoken round trips, the byte-length table, bad files."""
import random

import pytest
import torch

from nanochat.tokenizer import (BOS_TOKEN, SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer,
                                TokenizerFileError, save_tokenizer, train_bpe)

VOCAB = 512
RNG = random.Random(0)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n" * 20,
    "Numbers like 2024 and 1234567 split into pairs of digits. " * 10,
    "Ünïcödé text: naïve café, 東京, emoji 🙂. " * 10,
    # made-up words, so there are always more pairs to merge than the vocabulary needs
    " ".join("".join(RNG.choices("abcdefghijklmnopqrstuvwxyz", k=5)) for _ in range(3000)),
]
SAMPLES = ["hello world", "def f(x):\n\treturn x ** 2  # 🙂\n", "12345678", "café 東京", " leading and trailing "]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_bpe(iter(CORPUS), VOCAB), directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_directory(tokenizer_dir)


def test_vocabulary_holds_the_special_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB
    special_ids = [tokenizer.enc.encode_single_token(name) for name in SPECIAL_TOKENS]
    assert special_ids == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tokenizer.get_bos_token_id() == tokenizer.enc.encode_single_token(BOS_TOKEN) == special_ids[0]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < VOCAB - len(SPECIAL_TOKENS)  # ordinary text never yields a special token


def test_training_merged_frequent_text(tokenizer):
    assert len(tokenizer.encode("The quick brown fox")) < len("The quick brown fox".encode()) / 2


def test_digits_split_in_pairs_at_most(tokenizer):
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("1234567")]
    assert all(len(piece) <= 2 for piece in pieces)


def test_prepend_and_batch(tokenizer):
    bos = tokenizer.get_bos_token_id()
    assert tokenizer.encode("hi", prepend=bos) == [bos] + tokenizer.encode("hi")
    assert tokenizer.encode("hi", prepend=BOS_TOKEN) == [bos] + tokenizer.encode("hi")
    batch = tokenizer.encode(SAMPLES, prepend=bos)
    assert batch == [[bos] + tokenizer.encode(text) for text in SAMPLES]
    assert tokenizer.decode(batch[1]) == BOS_TOKEN + SAMPLES[1]


def test_special_token_text_is_ordinary_text(tokenizer):
    text = f"a {SPECIAL_TOKENS[1]} b"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert not any(tokenizer.enc.is_special_token(i) for i in ids)


def test_token_bytes_count_text_bytes_and_skip_specials(tokenizer):
    table = tokenizer.token_bytes
    assert table.shape == (VOCAB,) and table.dtype == torch.int32
    assert table[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    assert table[:256].tolist() == [1] * 256  # the byte tokens
    for text in SAMPLES:
        ids = tokenizer.encode(text, prepend=BOS_TOKEN)
        assert int(table[ids].sum()) == len(text.encode("utf-8"))


def test_missing_tokenizer_names_the_prepare_command(tmp_path):
    with pytest.raises(TokenizerFileError, match="uv run prepare.py"):
        Tokenizer.from_directory(tmp_path)


@pytest.mark.parametrize("name", [TOKENIZER_FILE, TOKEN_BYTES_FILE])
def test_truncated_file_is_a_clear_error(tokenizer_dir, tmp_path, name):
    for file in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
        (tmp_path / file).write_bytes((tokenizer_dir / file).read_bytes())
    damaged = tmp_path / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(TokenizerFileError) as error:
        Tokenizer.from_directory(tmp_path)
    message = str(error.value)
    assert str(damaged) in message and "corrupt or truncated" in message and "uv run prepare.py --force" in message


def test_garbage_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / TOKENIZER_FILE).write_bytes(b"not a pickle at all")
    with pytest.raises(TokenizerFileError, match="corrupt or truncated"):
        Tokenizer.from_directory(tmp_path)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="too small for a 4096-token vocabulary"):
        train_bpe(iter(["tiny text"]), 4096)


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(iter(CORPUS), 100)
