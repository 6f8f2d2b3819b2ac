"""Where prepared data lives: one cache folder, overridable with AUTORESEARCH_CACHE.

Layout (same as upstream autoresearch, plus the record of what was prepared):
    <cache>/data/shard_XXXXX.parquet   text shards; the last one (sorted) is validation
    <cache>/tokenizer/tokenizer.pkl    the BPE merges, pattern and special tokens
    <cache>/tokenizer/token_bytes.pt   bytes per token id (0 for special tokens)
    <cache>/prepared.json              profile, data set and constants chosen at prepare time
    <cache>/offline_seed               the secret that picks the offline corpus's files (runs never see it)
"""
import os
from pathlib import Path

PREPARE_COMMAND = "uv run prepare.py"


def cache_dir() -> Path:
    configured = os.environ.get("AUTORESEARCH_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "autoresearch"


def data_dir() -> Path:
    return cache_dir() / "data"


def tokenizer_dir() -> Path:
    return cache_dir() / "tokenizer"


def prepared_record_path() -> Path:
    return cache_dir() / "prepared.json"


def offline_seed_path() -> Path:
    return cache_dir() / "offline_seed"
