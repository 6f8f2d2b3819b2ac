"""The BOS-aligned best-fit dataloader: rows of whole documents, no padding.

Every document is tokenized with BOS in front. Each row of T+1 tokens is filled greedily with
the largest buffered document that still fits; when none fits, the shortest one is cropped to
fill the row (its rest is dropped). So every row starts with BOS and every token is real text.
Inputs are the row without its last token, targets the row without its first.
"""
import bisect
import itertools
import os

import numpy as np
import torch

from nanochat.datasets import check_shard, iter_text_batches, split_paths
from nanochat.platform import DEVICE

TOKENIZE_BATCH = 128  # documents per encode_ordinary_batch call (threads share the work)
DOC_BUFFER = 1000  # documents to choose from when packing a row
# The server's reruns (noise repeats, confirmations) train on another stretch of the data: with the
# CPU profile's flops clock a rerun of the same code otherwise repeats to ~1e-5, so only the luck of
# the data shows how much val_bpb moves without a change. Order k starts at the fraction k * 0.618...
# (mod 1) of the training split: each new order falls in one of the largest gaps that the earlier
# ones left, so the first ones are far apart and none starts where the usual order does. Every pass
# of an order goes round the whole split from its start (to the end, then from the beginning up to
# the start), so no order ends a pass sooner than the usual one: a pass's end drains the document
# buffer, and its last rows are the documents best-fit passed over (a row's worth of tokens in fewer
# characters: tables, data), so order 1, which began 62% in and ended its pass at step ~117 of a
# CPU run's 130 (a run reads ~3,600 of the offline corpus's ~9,500 documents), warmed down on them.
DATA_ORDER_ENV = "AUTORESEARCH_DATA_ORDER"
GOLDEN_FRACTION = (5 ** 0.5 - 1) / 2


def data_order() -> int:
    value = os.environ.get(DATA_ORDER_ENV, "0")
    if not value.isdigit():
        raise RuntimeError(f"{DATA_ORDER_ENV}={value!r} must be a whole number (0: the usual order).")
    return int(value)


def data_order_start(order: int, documents: int) -> int:
    """The document a data order's first pass starts at, in a split of `documents`."""
    return int(documents * (order * GOLDEN_FRACTION % 1.0))


def _pass_texts(paths, start: int):
    """Lists of document strings: one pass over the split, from document `start` to its end, then
    from its beginning up to `start`."""
    yield from iter_text_batches(paths, TOKENIZE_BATCH, start)
    for texts in iter_text_batches(paths, TOKENIZE_BATCH):
        if start <= 0:
            return
        yield texts[:start]
        start -= len(texts)


def _token_batches(tokenizer, paths, start: int = 0):
    """Forever: (list of int64 arrays, one per document with BOS first, epoch); epoch = pass number.
    Every pass starts at document `start`."""
    bos = tokenizer.get_bos_token_id()
    for epoch in itertools.count(1):
        for texts in _pass_texts(paths, start):
            encoded = tokenizer.encode(texts, prepend=bos)
            lengths = [len(ids) for ids in encoded]
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=sum(lengths))
            yield np.split(flat, np.cumsum(lengths[:-1])), epoch


class _DocumentPool:
    """Buffered documents sorted by length, for 'largest that fits' in O(log n)."""

    def __init__(self):
        self.entries = []  # (length, arrival, tokens); arrival breaks ties and is never equal
        self.arrivals = itertools.count()

    def __len__(self):
        return len(self.entries)

    def add(self, docs):
        for doc in docs:
            bisect.insort(self.entries, (len(doc), next(self.arrivals), doc))

    def take(self, space: int) -> np.ndarray:
        """The largest document of at most `space` tokens, else the shortest one cropped to `space`."""
        fits = bisect.bisect_left(self.entries, (space + 1,)) - 1
        if fits >= 0:
            return self.entries.pop(fits)[2]
        return self.entries.pop(0)[2][:space]


def _pack_rows(pool, refill, B: int, row_len: int) -> np.ndarray:
    rows = np.empty((B, row_len), dtype=np.int64)
    for row in rows:
        filled = 0
        while filled < row_len:
            refill()
            doc = pool.take(row_len - filled)
            row[filled:filled + len(doc)] = doc
            filled += len(doc)
    return rows


def make_dataloader(tokenizer, B: int, T: int, split: str, device=None, directory=None, paths=None):
    """Infinite generator of (x, y, epoch): LongTensors (B, T) on device (default: the platform's).
    paths: the split's shards, where they are not the cache's (the harness's evaluation reads its
    own copy of the validation shard).

    Bad arguments and missing data fail here, at the call, not at the first batch.
    """
    device = torch.device(device) if device is not None else DEVICE
    paths = paths or split_paths(split, directory)
    order = data_order() if split == "train" else 0
    start = data_order_start(order, sum(map(check_shard, paths))) if order else 0  # rows from the footers
    return _batches(_token_batches(tokenizer, paths, start), B, T, device)


def _batches(token_batches, B: int, T: int, device: torch.device):
    pool = _DocumentPool()
    upcoming, epoch = next(token_batches), 1  # the next tokenized batch, and the pass being packed

    def refill():
        """Top the pool up to DOC_BUFFER documents, but start the next pass only once this one's
        documents are used up: a small data set would otherwise buffer a document twice."""
        nonlocal upcoming, epoch
        while len(pool) < DOC_BUFFER and (upcoming[1] == epoch or len(pool) == 0):
            pool.add(upcoming[0])
            epoch = upcoming[1]
            upcoming = next(token_batches)

    pin = device.type == "cuda"
    while True:
        rows = _pack_rows(pool, refill, B, T + 1)
        # inputs and targets side by side in one buffer: one host->device copy per batch
        staging = torch.empty((2, B, T), dtype=torch.long, pin_memory=pin)
        pair = staging.numpy()
        pair[0] = rows[:, :-1]
        pair[1] = rows[:, 1:]
        on_device = staging if device.type == "cpu" else staging.to(device, non_blocking=pin)
        yield on_device[0], on_device[1], epoch
