"""Text data sets as parquet shards with a `text` column; the last shard (sorted) is validation.

Four sources: the upstream climbmix shards (downloaded), one TinyStories file (downloaded and
converted), a user's folder of .txt/.jsonl/.parquet files, and an offline corpus made of the
Python standard library's own source files, which every Python installation carries.

Local corpora are cut into documents of about a row's length: the dataloader crops a document
that fits nowhere and drops the rest, so book-sized documents would mostly be thrown away.
"""
import hashlib
import json
import os
import random
import secrets
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.cache import PREPARE_COMMAND, cache_dir, data_dir, offline_seed_path, prepared_record_path
from nanochat.download import download_file

SHARD_PATTERN = "shard_{:05d}.parquet"
SOURCE_KEY = b"autoresearch_source"  # parquet metadata naming the data set a shard was written from
ROW_GROUP_ROWS = 1024
SHARD_CHARS = 1_000_000  # text per locally written train shard
# Local train documents are shuffled in pools of this much text before they are written: a source
# cut into documents (a file, a book) would otherwise fill a stretch of the data alone, and a run
# (or a rerun on another data order) would train on a few sources instead of a sample of all.
SHUFFLE_POOL_CHARS = 50_000_000
SHUFFLE_SEED = 0

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_LAST_SHARD = 6542  # upstream pins this one as validation
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILE = "TinyStoriesV2-GPT4-valid.txt"  # ~22 MB: small enough for a laptop
TINYSTORIES_SEPARATOR = "<|endoftext|>"

OFFLINE_TOTAL_CHARS = 6_000_000  # enough for a 60 s CPU run without many repeats; tokenizer trains in seconds
OFFLINE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                     "encodings", "pydoc_data", "lib2to3", "ensurepip", "turtledemo"}  # tests, tables, vendored
# The offline corpus is the standard library, which every run can read: with a public selection train.py
# could rebuild the validation text from it and train on that. A secret seed, drawn at the first prepare
# and kept where the runs' sandboxes cannot read (harness_eval.hidden_from_runs), picks and orders the
# files instead; a cluster node's prepare gets the server's, so their numbers compare.
OFFLINE_SEED_ENV = "AUTORESEARCH_OFFLINE_SEED"
CHARS_PER_TOKEN_ESTIMATE = 4  # generous, so the validation shard holds at least the eval tokens
MAX_VAL_FRACTION = 0.1  # of a corpus too small to hold a whole evaluation's worth of validation text
FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")


class ShardError(RuntimeError):
    """A data shard is unreadable (corrupt, truncated) or missing its `text` column."""


def _shard_error(path: Path, problem: str) -> ShardError:
    return ShardError(f"Data shard {path} is {problem}. Run `{PREPARE_COMMAND}` again with the same "
                      f"choices: it rebuilds or re-downloads broken shards.")


# ---------------------------------------------------------------------------------------------
# Reading shards

def list_shards(directory=None) -> list:
    directory = Path(directory) if directory else data_dir()
    return sorted(directory.glob("shard_*.parquet")) if directory.is_dir() else []


def split_paths(split: str, directory=None) -> list:
    """Val = the shard prepare pinned (by name and content) in the cache's record, else the last
    one in sorted order (upstream's rule); train = every other shard."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(directory)
    if len(shards) < 2:
        where = Path(directory) if directory else data_dir()
        raise FileNotFoundError(f"No prepared data in {where} (need at least one train and one validation "
                                f"shard). Run `{PREPARE_COMMAND}` first.")
    pinned = pinned_val_name() if directory is None else None
    val = next((s for s in shards if s.name == pinned), shards[-1])
    return [s for s in shards if s != val] if split == "train" else [val]


def pinned_val_name() -> str | None:
    try:
        record = json.loads(prepared_record_path().read_text())
        return record["val_shard"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pin() -> dict:
    """The validation shard as prepare records it: name, size and content hash."""
    path = list_shards()[-1]
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard, reading its footer and schema (cheap), or raise ShardError naming it."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise _shard_error(path, f"corrupt or truncated ({e})") from e
    if "text" not in parquet.schema_arrow.names:
        raise _shard_error(path, "missing its `text` column")
    return parquet


def check_shard(path: Path) -> int:
    """The shard's row count, or ShardError when it is unreadable."""
    return _open_shard(path).metadata.num_rows


def iter_text_batches(paths, batch_size: int, skip_docs: int = 0):
    """Yield lists of up to batch_size document strings, shard by shard, row group by row group,
    leaving out the first skip_docs documents (whole row groups skipped unread)."""
    for path in paths:
        parquet = _open_shard(path)
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if skip_docs >= rows:
                skip_docs -= rows
                continue
            try:
                texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise _shard_error(path, f"corrupt in row group {group} ({e})") from e
            texts, skip_docs = texts[skip_docs:], 0
            for start in range(0, len(texts), batch_size):
                yield texts[start:start + batch_size]


def iter_training_text(max_chars: int, doc_chars: int):
    """Train-split documents for the tokenizer: each cut to doc_chars, max_chars in total."""
    seen = 0
    for texts in iter_text_batches(split_paths("train"), 1024):
        for text in texts:
            text = text[:doc_chars]
            yield text
            seen += len(text)
            if seen >= max_chars:
                return


# ---------------------------------------------------------------------------------------------
# Writing shards

def _write_shard(texts: list, path: Path, source: str) -> None:
    table = pa.table({"text": pa.array(texts, type=pa.string())}).replace_schema_metadata({SOURCE_KEY: source})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, path)


def shard_source(path: Path):
    """The data set a shard came from: what we wrote in its metadata, 'climbmix' for upstream's
    shards (they carry none), None when unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:
        return None
    return metadata.get(SOURCE_KEY, b"climbmix").decode()


def write_corpus(documents, val_chars: int, directory: Path, source: str = "local", report=print) -> int:
    """Stream documents into shards: the first val_chars of text become the last (validation) shard,
    the rest is shuffled (in pools of SHUFFLE_POOL_CHARS) into train shards.

    Returns the number of shards written. Validation comes first in the stream so that it holds
    whole sources the train shards never saw; it is written last so that it sorts last. A corpus
    too small for val_chars gives validation at most MAX_VAL_FRACTION of its text (evaluation then
    cycles). source (the data set's name) is stored in each shard, so shards of different origins
    never mix.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shuffler = random.Random(SHUFFLE_SEED)
    val, val_size, train_size, index = [], 0, 0, 0
    pool, pool_size = [], 0
    for doc in documents:
        if val_size < val_chars:
            val.append(doc)
            val_size += len(doc)
            continue
        pool.append(doc)
        pool_size += len(doc)
        train_size += len(doc)
        if pool_size >= SHUFFLE_POOL_CHARS:
            index = _write_train_shards(pool, shuffler, directory, index, source, report)
            pool, pool_size = [], 0
    keep, kept_size = 0, 0
    while keep < len(val) and kept_size < MAX_VAL_FRACTION * (val_size + train_size):
        kept_size += len(val[keep])
        keep += 1
    index = _write_train_shards(pool + val[keep:], shuffler, directory, index, source, report)
    val = val[:keep]
    if index == 0 or not val:
        raise ValueError("Not enough text for a train and a validation shard. Give the data set more text.")
    _write_shard(val, directory / SHARD_PATTERN.format(index), source)
    report(f"wrote validation shard {index} ({kept_size / 1e6:.2f}M chars)")
    if kept_size < val_chars:
        report(f"note: evaluation wants about {val_chars / 1e6:.1f}M chars of validation text; "
               f"it will cycle over these {kept_size / 1e6:.2f}M")
    return index + 1


def _write_train_shards(docs: list, shuffler: random.Random, directory: Path, index: int, source: str,
                        report) -> int:
    """Shuffles the documents and writes them into shards of about SHARD_CHARS; returns the next index."""
    shuffler.shuffle(docs)
    shard, size = [], 0
    for doc in docs:
        shard.append(doc)
        size += len(doc)
        if size >= SHARD_CHARS:
            index = _write_train_shard(shard, directory, index, source, report)
            shard, size = [], 0
    return _write_train_shard(shard, directory, index, source, report) if shard else index


def _write_train_shard(texts: list, directory: Path, index: int, source: str, report) -> int:
    _write_shard(texts, directory / SHARD_PATTERN.format(index), source)
    report(f"wrote shard {index} ({sum(map(len, texts)) / 1e6:.1f}M chars)")
    return index + 1


def cut_documents(text: str, max_chars: int):
    """Split text into pieces of at most max_chars, at blank lines where possible, else at lines."""
    piece = ""
    for paragraph in text.split("\n\n"):
        paragraph += "\n\n"
        while len(paragraph) > max_chars:  # a paragraph too long on its own: cut at a newline
            cut = paragraph.rfind("\n", 0, max_chars) + 1 or max_chars
            if piece:
                yield piece
                piece = ""
            yield paragraph[:cut]
            paragraph = paragraph[cut:]
        if len(piece) + len(paragraph) > max_chars:
            yield piece
            piece = ""
        piece += paragraph
    if piece.strip():
        yield piece


def val_chars_for(eval_tokens: int) -> int:
    return eval_tokens * CHARS_PER_TOKEN_ESTIMATE


# ---------------------------------------------------------------------------------------------
# The four sources

def offline_seed() -> str:
    """The seed of the offline selection: the one given (a cluster node), else this cache's, else a new one."""
    given = os.environ.get(OFFLINE_SEED_ENV, "").strip()
    if given:
        return given
    try:
        return offline_seed_path().read_text().strip() or secrets.token_hex(16)
    except FileNotFoundError:
        return secrets.token_hex(16)


def selection_digest(seed: str) -> str:
    """What the prepared record keeps of the seed: it names the selection without giving it away."""
    return hashlib.sha256(seed.encode()).hexdigest()


def keep_offline_seed(seed: str) -> None:
    path = offline_seed_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(seed + "\n")


def offline_source_files(seed: str) -> list:
    """The selection: stdlib .py files, sorted, shuffled with the seed, capped in size; about a third
    of the library stays out, so a run that trains on every file it cannot place sees little validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not (set(p.relative_to(root).parts[:-1]) & OFFLINE_SKIP_DIRS) and not p.name.startswith("test_")]
    random.Random(seed).shuffle(files)  # secret, and spread over the whole library, not a-to-c
    chosen, total = [], 0
    for path in files:
        if total >= OFFLINE_TOTAL_CHARS:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def offline_documents(max_doc_chars: int, seed: str):
    for path in offline_source_files(seed):
        yield from cut_documents(path.read_text(encoding="utf-8", errors="replace"), max_doc_chars)


def _folder_files(folder: Path) -> list:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # .git, .cache
    if not files:
        raise FileNotFoundError(f"No .txt, .jsonl or .parquet files under {folder}. Put text there, "
                                f"or choose another --dataset (offline works without any).")
    return files


def _jsonl_texts(path: Path):
    # bytes that are not UTF-8 read as U+FFFD, as in a .txt file: a strict read raised from the loop, naming no file
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                assert isinstance(text, str)
            except Exception as e:
                raise ValueError(f"{path} line {number}: expected a JSON object with a string \"text\" "
                                 f"field ({type(e).__name__}). Fix or remove that line.") from e
            yield text


def _parquet_texts(path: Path):
    for texts in iter_text_batches([path], ROW_GROUP_ROWS):
        yield from texts


def folder_documents(folder: Path, max_doc_chars: int):
    """Every .txt file is one text, every jsonl line and parquet row another; in sorted path order."""
    for path in _folder_files(folder):
        if path.suffix == ".txt":
            texts = [path.read_text(encoding="utf-8", errors="replace")]
        elif path.suffix == ".jsonl":
            texts = _jsonl_texts(path)
        else:
            texts = _parquet_texts(path)
        for text in texts:
            yield from cut_documents(text, max_doc_chars)


def download_climbmix(num_train_shards: int, base_url: str, progress=None, report=print) -> None:
    """Upstream's shards, straight into the data folder (their names already sort val last)."""
    if not 1 <= num_train_shards <= CLIMBMIX_LAST_SHARD:
        raise ValueError(f"--num-shards must be between 1 and {CLIMBMIX_LAST_SHARD}, got {num_train_shards}")
    indices = list(range(num_train_shards)) + [CLIMBMIX_LAST_SHARD]
    for n, index in enumerate(indices, 1):
        path = data_dir() / SHARD_PATTERN.format(index)
        if path.exists():
            try:
                check_shard(path)
                report(f"shard {n}/{len(indices)}: {path.name} already here")
                continue
            except ShardError:
                report(f"shard {n}/{len(indices)}: {path.name} is unreadable, downloading it again")
                path.unlink()
        else:
            report(f"shard {n}/{len(indices)}: {path.name}")
        download_file(f"{base_url.rstrip('/')}/{path.name}", path, validate=check_shard, progress=progress)


def tinystories_documents(base_url: str, progress=None):
    path = download_file(f"{base_url.rstrip('/')}/{TINYSTORIES_FILE}",
                         cache_dir() / "downloads" / TINYSTORIES_FILE, progress=progress)
    text = path.read_text(encoding="utf-8", errors="replace")
    for story in text.split(TINYSTORIES_SEPARATOR):
        if story.strip():
            yield story.strip()
