"""The best-fit dataloader: BOS-aligned rows of whole documents, no padding, shifted targets."""
import itertools
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nanochat.dataloader import DATA_ORDER_ENV, _DocumentPool, data_order_start, make_dataloader
from nanochat.datasets import (
    ShardError, check_shard, iter_text_batches, offline_documents, split_paths, val_chars_for, write_corpus,
)
from nanochat.tokenizer import Tokenizer

B, T = 4, 64


@pytest.fixture(scope="module")
def tokenizer(prepared_env):
    return Tokenizer.from_directory(Path(prepared_env["AUTORESEARCH_CACHE"]) / "tokenizer")


def make_documents(count: int, seed: int = 0, word_counts=(1, 5, 20, 60, 200)) -> list:
    """Numbered documents, by default from a few tokens to several rows long."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "print(x)", "return", "42", "the", "of", "data"]
    return [f"doc {i}: " + " ".join(rng.choices(words, k=rng.choice(word_counts)))
            for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A data folder: 2 train shards (~1 MB of text each) and a validation shard."""
    directory = tmp_path_factory.mktemp("data")
    documents = make_documents(6000)
    write_corpus(iter(documents), val_chars=20_000, directory=directory, report=lambda line: None)
    return directory, documents


def segments(row: list, bos: int) -> list:
    starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
    return [row[a:b] for a, b in itertools.pairwise(starts)]


def test_rows_start_with_bos_and_targets_are_shifted(tokenizer, corpus):
    loader = make_dataloader(tokenizer, B, T, "train", device="cpu", directory=corpus[0])
    for _ in range(5):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert epoch == 1


def test_rows_are_whole_documents_then_one_crop(tokenizer, corpus):
    """No padding: every token belongs to a document; only a row's last document may be cropped."""
    directory, documents = corpus
    bos = tokenizer.get_bos_token_id()
    encoded = {tuple(ids) for ids in tokenizer.encode(documents, prepend=bos)}
    prefixes = {ids[:n] for ids in encoded for n in range(1, min(len(ids), T + 1) + 1)}
    loader = make_dataloader(tokenizer, B, T, "train", device="cpu", directory=directory)
    used, crops = [], 0
    # At least 10 batches, and on until a crop was seen: how soon one comes depends on the tokenizer,
    # which is trained on the running Python's own standard library (16 batches with Debian's 3.11.2).
    for batch in range(200):
        x, y, _ = next(loader)
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():  # the full row of T+1 tokens
            pieces = segments(row, bos)
            assert row[0] == bos and sum(map(len, pieces)) == T + 1
            for piece in pieces[:-1]:
                assert tuple(piece) in encoded, "a document inside a row must be whole"
            assert tuple(pieces[-1]) in prefixes
            crops += tuple(pieces[-1]) not in encoded
            used += map(tuple, pieces)
        if batch >= 9 and crops:
            break
    whole = [piece for piece in used if piece in encoded]
    assert len(whole) == len(set(whole)), "no document is used twice within an epoch"
    assert crops > 0  # the corpus has documents longer than a row: cropping was exercised


def test_best_fit_takes_the_largest_that_fits_else_crops_the_shortest():
    pool = _DocumentPool()
    pool.add([np.arange(n) for n in (5, 3, 8, 2, 5)])
    assert len(pool.take(6)) == 5
    assert len(pool.take(4)) == 3
    assert len(pool.take(5)) == 5
    assert pool.take(1).tolist() == [0]  # nothing fits in 1: the shortest (2) is cropped
    assert len(pool.take(100)) == 8 and len(pool) == 0


def test_epoch_counts_passes_over_the_train_shards(tokenizer, tmp_path):
    """Even a data set smaller than the document buffer is used once per pass, never twice at once."""
    documents = make_documents(300, seed=1, word_counts=(1, 2, 3))
    write_corpus(iter(documents), val_chars=1000, directory=tmp_path, report=lambda line: None)
    bos = tokenizer.get_bos_token_id()
    encoded = {tuple(ids) for ids in tokenizer.encode(documents, prepend=bos)}
    loader = make_dataloader(tokenizer, B, T, "train", device="cpu", directory=tmp_path)
    seen_by_epoch = {}
    for _ in range(100):
        x, y, epoch = next(loader)
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            seen_by_epoch.setdefault(epoch, []).extend(p for p in map(tuple, segments(row, bos)) if p in encoded)
    epochs = sorted(seen_by_epoch)
    assert epochs[0] == 1 and len(epochs) >= 3
    first_pass = seen_by_epoch[1]
    assert len(first_pass) == len(set(first_pass)) > 0.5 * len(encoded)  # the rest: validation, crops


def test_a_stretch_of_the_train_split_mixes_every_source(tmp_path):
    """A local corpus comes source by source (a file cut into documents): its train documents are
    shuffled, so a run's stretch of the data samples all sources; validation keeps whole sources
    that training never sees."""
    documents = [f"doc {i}: source {i // 50} " + "word " * 40 for i in range(4000)]  # 80 sources of 50
    write_corpus(iter(documents), val_chars=20_000, directory=tmp_path, report=lambda line: None)
    position = split_positions(tmp_path)
    order = sorted(position, key=position.get)
    assert len({n // 50 for n in order[:200]}) > 40  # the first 200 in stream order: 4 sources
    val_texts = next(iter_text_batches(split_paths("val", tmp_path), 10_000))
    val_sources = {int(re.search(r"source (\d+)", t).group(1)) for t in val_texts}
    assert len(val_sources - {max(val_sources)}) > 0 and not {n // 50 for n in order} & (val_sources - {max(val_sources)})
    assert len(order) + len(val_texts) == len(documents)  # nothing lost, nothing twice


def test_validation_batches_are_identical_every_time(tokenizer, corpus):
    first = next(make_dataloader(tokenizer, B, T, "val", device="cpu", directory=corpus[0]))
    again = next(make_dataloader(tokenizer, B, T, "val", device="cpu", directory=corpus[0]))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_corrupt_shard_stops_with_its_name(tokenizer, tmp_path):
    write_corpus(iter(make_documents(6000, seed=2)), val_chars=20_000, directory=tmp_path, report=lambda line: None)
    broken = split_paths("train", tmp_path)[1]
    broken.write_bytes(broken.read_bytes()[:1000])
    loader = make_dataloader(tokenizer, B, T, "train", device="cpu", directory=tmp_path)
    with pytest.raises(ShardError, match=f"{broken}.*corrupt or truncated"):
        for _ in range(10_000):
            next(loader)


def test_no_data_names_the_prepare_command(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="uv run prepare.py"):
        make_dataloader(tokenizer, B, T, "train", device="cpu", directory=tmp_path)


def test_unknown_split_is_refused(tokenizer, corpus):
    with pytest.raises(ValueError, match="'train' or 'val'"):
        make_dataloader(tokenizer, B, T, "test", device="cpu", directory=corpus[0])


def first_documents(tokenizer, directory, split="train") -> set:
    """The numbers of the documents that start in the first batch."""
    x, _, _ = next(make_dataloader(tokenizer, B, T, split, device="cpu", directory=directory))
    text = "".join(tokenizer.decode(row) for row in x.tolist())
    return {int(number) for number in re.findall(r"doc (\d+):", text)}


def split_positions(directory) -> dict:
    """Each train document's number -> its position in the train split."""
    texts = itertools.chain.from_iterable(iter_text_batches(split_paths("train", directory), 1024))
    return {int(re.match(r"doc (\d+):", text).group(1)): i for i, text in enumerate(texts)}


def test_a_data_order_trains_on_another_stretch_of_the_documents(tokenizer, corpus, monkeypatch):
    """A rerun's data order (set by the server's worker) starts the training stream elsewhere in the
    split, far from the usual start and from the other orders; the validation batches do not move."""
    position = split_positions(corpus[0])
    usual = {position[n] for n in first_documents(tokenizer, corpus[0])}
    validation = first_documents(tokenizer, corpus[0], "val")
    documents = sum(map(check_shard, split_paths("train", corpus[0])))
    starts = sorted(data_order_start(k, documents) for k in range(10))
    assert starts[0] == 0 and min(b - a for a, b in zip(starts, starts[1:])) > documents / 20  # well spread
    for order in (1, 2, 9):
        monkeypatch.setenv(DATA_ORDER_ENV, str(order))
        later = {position[n] for n in first_documents(tokenizer, corpus[0])}
        assert later and min(later) >= data_order_start(order, documents) and not later & usual, order
    assert first_documents(tokenizer, corpus[0], "val") == validation
    monkeypatch.setenv(DATA_ORDER_ENV, "-1")
    with pytest.raises(RuntimeError, match="must be a whole number"):
        make_dataloader(tokenizer, B, T, "train", device="cpu", directory=corpus[0])


RUN_STEPS, RUN_ROWS, RUN_T = 130, 16, 256  # a CPU-profile run: the demo's baseline trains 130 steps of 16 x 256


def bytes_per_token_by_step(tokenizer, directory) -> tuple[np.ndarray, int]:
    """(the bytes per target token of each of a CPU run's batches, the last pass it reached)."""
    loader = make_dataloader(tokenizer, RUN_ROWS, RUN_T, "train", device="cpu", directory=directory)
    per_step, epoch = [], 1
    for _ in range(RUN_STEPS):
        _, y, epoch = next(loader)
        per_step.append(tokenizer.token_bytes[y.flatten()].sum().item() / y.numel())
    return np.array(per_step), epoch


@pytest.mark.parametrize("seed", ["a", "b", "c"])
def test_every_data_order_trains_a_cpu_run_on_the_same_kind_of_text(tokenizer, tmp_path, monkeypatch, seed):
    """The offline corpus, drawn with a few seeds: what a CPU run trains on, in the usual order and
    the first reruns' orders, is alike to its last steps. Order 1 started 62% into the split and its
    pass ended at step ~117: the buffer drained to the documents best-fit had passed over (tables,
    data: ~2.9 bytes a token, not ~3.7), and the run warmed down on them."""
    write_corpus(offline_documents(3 * RUN_T, seed), val_chars=val_chars_for(2**16), directory=tmp_path,
                 report=lambda line: None)
    usual, _ = bytes_per_token_by_step(tokenizer, tmp_path)
    for order in (1, 2, 3):
        monkeypatch.setenv(DATA_ORDER_ENV, str(order))
        steps, epoch = bytes_per_token_by_step(tokenizer, tmp_path)
        assert epoch == 1, order  # a run reads ~40% of the split: every order's first pass is a whole one
        assert abs(steps[-20:].mean() / usual.mean() - 1) < 0.06, (order, steps[-20:].mean(), usual.mean())
        assert abs(steps.mean() / usual.mean() - 1) < 0.03, (order, steps.mean(), usual.mean())
