"""prepare.py end to end (offline and a user's folder, in temp caches) and its data sets."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.datasets import (
    OFFLINE_SKIP_DIRS,
    OFFLINE_TOTAL_CHARS,
    check_shard,
    cut_documents,
    folder_documents,
    list_shards,
    offline_source_files,
    selection_digest,
    shard_source,
    write_corpus,
)
from conftest import TEST_EVAL_TOKENS, TEST_TIME_BUDGET
from nanochat.profiles import PROFILES

PEAK_FILE = "cpu_peak_flops.json"  # nanochat.platform's (which imports torch)


def run(args, env, repo_root, **extra_env):
    return subprocess.run([sys.executable, *args], cwd=repo_root, env={**env, **extra_env},
                          capture_output=True, text=True)


def random_text(rng, words, count) -> str:
    return " ".join(rng.choices(words, k=count)) + "\n"


def with_the_peak(prepared_env, cache: Path) -> Path:
    """The cache, given the matmul peak for MFU the session's cache measured: measured once per machine (seconds of
    both cores), which no test here is about, where each new cache's prepare would measure it again."""
    (cache / "compile").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(prepared_env["AUTORESEARCH_CACHE"]) / "compile" / PEAK_FILE, cache / "compile" / PEAK_FILE)
    return cache


def copied_cache(prepared_env, cache: Path) -> Path:
    """A copy of the session's prepared cache, without its compile cache but for the peak."""
    shutil.copytree(prepared_env["AUTORESEARCH_CACHE"], cache, ignore=shutil.ignore_patterns("compile"))
    return with_the_peak(prepared_env, cache)


@pytest.fixture
def empty_env(prepared_env, tmp_path):
    return {**prepared_env, "AUTORESEARCH_CACHE": str(with_the_peak(prepared_env, tmp_path / "cache"))}


def fake_nvidia_smi(folder, name="NVIDIA H100 80GB HBM3", driver="535.104.05") -> str:
    """A PATH on which nvidia-smi answers as on a GPU machine with that driver: torch here cannot use it."""
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{name}, {driver}'\n")
    script.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_a_gpu_torch_cannot_use_stops_prepare_with_the_reason_and_the_fix(empty_env, repo_root, tmp_path):
    """An H100 on a driver older than the wheel's CUDA needs: prepare stops and says what to do, and
    records no cpu profile."""
    import torch
    done = run(["prepare.py"], empty_env, repo_root, PATH=fake_nvidia_smi(tmp_path / "bin"))
    assert done.returncode != 0
    assert "NVIDIA H100 80GB HBM3 (driver 535.104.05)" in done.stderr, done.stderr
    if torch.version.cuda:  # this wheel's CUDA and the driver it needs
        assert f"CUDA {torch.version.cuda}" in done.stderr and "580.65.06 or newer" in done.stderr
    assert "cu126" in done.stderr and "uv sync" in done.stderr and "AUTORESEARCH_DEVICE=cpu" in done.stderr
    assert not (Path(empty_env["AUTORESEARCH_CACHE"]) / "prepared.json").exists()


def test_a_new_enough_driver_that_torch_still_cannot_use_says_what_to_check(empty_env, repo_root, tmp_path):
    done = run(["prepare.py"], empty_env, repo_root, PATH=fake_nvidia_smi(tmp_path / "bin", driver="590.44.01"))
    assert done.returncode != 0
    assert "CUDA_VISIBLE_DEVICES" in done.stderr and "LD_LIBRARY_PATH" in done.stderr, done.stderr


def test_the_cpu_on_a_gpu_machine_only_when_asked(prepared_env, repo_root, tmp_path):
    path = fake_nvidia_smi(tmp_path / "bin")
    for env in ({"AUTORESEARCH_DEVICE": "cpu"}, {"CUDA_VISIBLE_DEVICES": ""}):
        done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline"], prepared_env, repo_root,
                   PATH=path, **env)
        assert done.returncode == 0, done.stderr
    done = run(["prepare.py"], prepared_env, repo_root, PATH=path, AUTORESEARCH_DEVICE="cuda")
    assert done.returncode != 0 and "only 'cpu'" in done.stderr


# ---------------------------------------------------------------------------------------------
# The prepared offline cache (shared by the whole session: these tests only read it)

def test_offline_cache_is_recorded_and_complete(prepared_env):
    cache = Path(prepared_env["AUTORESEARCH_CACHE"])
    record = json.loads((cache / "prepared.json").read_text())
    assert (record["profile"], record["dataset"]) == ("cpu", "offline")
    assert all(record[key] == PROFILES["cpu"][key] for key in ("vocab_size", "max_seq_len", "time_budget", "eval_tokens"))
    shards = list_shards(cache / "data")
    assert len(shards) == record["num_train_shards"] + 1 >= 2
    assert all(check_shard(shard) > 0 for shard in shards)
    assert {p.name for p in (cache / "tokenizer").iterdir()} == {"tokenizer.pkl", "token_bytes.pt"}


def test_second_run_does_nothing_and_says_so(prepared_env, repo_root):
    record = Path(prepared_env["AUTORESEARCH_CACHE"]) / "prepared.json"
    before = record.read_text()
    done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline"], prepared_env, repo_root)
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout
    assert record.read_text() == before


def test_other_profile_is_refused_with_the_way_out(prepared_env, repo_root):
    record = Path(prepared_env["AUTORESEARCH_CACHE"]) / "prepared.json"
    before = record.read_text()
    done = run(["prepare.py", "--profile", "gpu"], prepared_env, repo_root)
    assert done.returncode == 2
    assert "profile is 'cpu', asked 'gpu'" in done.stderr
    assert "--force" in done.stderr and "AUTORESEARCH_CACHE" in done.stderr
    assert record.read_text() == before


def test_import_gives_the_contract_with_overrides(prepared_env, repo_root):
    script = ("import prepare\n"
              "print(prepare.PROFILE, prepare.MAX_SEQ_LEN, prepare.TIME_BUDGET, prepare.EVAL_TOKENS, "
              "prepare.VOCAB_SIZE, prepare.TRAIN_DEFAULTS['depth'])\n"
              "from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb\n"
              "x, y, epoch = next(make_dataloader(Tokenizer.from_directory(), 2, MAX_SEQ_LEN, 'train'))\n"
              "print(tuple(x.shape), epoch)\n")
    done = run(["-c", script], prepared_env, repo_root)
    assert done.returncode == 0, done.stderr
    cpu = PROFILES["cpu"]
    assert done.stdout.split("\n")[:2] == [
        f"cpu {cpu['max_seq_len']} {TEST_TIME_BUDGET} {TEST_EVAL_TOKENS} {cpu['vocab_size']} {cpu['train_defaults']['depth']}",
        f"(2, {cpu['max_seq_len']}) 1"]


@pytest.mark.parametrize("name, value, message", [
    ("AUTORESEARCH_PROFILE", "h100", "prepared for profile 'cpu'"),
    ("AUTORESEARCH_TIME_BUDGET", "soon", "must be a positive number"),
])
def test_import_refuses_bad_environment(prepared_env, repo_root, name, value, message):
    done = run(["-c", "import prepare"], prepared_env, repo_root, **{name: value})
    assert done.returncode != 0 and message in done.stderr


def test_import_with_nothing_prepared_names_the_command(empty_env, repo_root):
    done = run(["-c", "import prepare"], empty_env, repo_root)
    assert done.returncode != 0
    assert "Nothing is prepared in" in done.stderr and "uv run prepare.py" in done.stderr


# ---------------------------------------------------------------------------------------------
# Fresh caches

@pytest.fixture
def text_folder(tmp_path):
    """A user's folder: .txt, .jsonl and .parquet files, some nested, plus a file to ignore."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    folder = tmp_path / "texts"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("".join(random_text(rng, words, 60) for _ in range(1500)))
    (folder / "nested" / "b.jsonl").write_text(
        "".join(json.dumps({"text": random_text(rng, words, 100), "id": i}) + "\n" for i in range(1500)))
    pq.write_table(pa.table({"text": [random_text(rng, words, 80) for _ in range(1500)]}), folder / "c.parquet")
    (folder / "notes.md").write_text("ignored")
    return folder


def test_the_offline_validation_files_are_the_caches_secret_kept_through_repairs(prepared_env, repo_root, tmp_path):
    """The offline corpus is the standard library, which runs can read: a secret seed picks its files
    (a run's sandbox hides it: test_integrity.py), so train.py cannot tell which are validation. A
    repair draws the same files; a cache prepared when the selection was public is drawn again; a
    cluster node given the server's seed draws the server's files."""
    cache = tmp_path / "cache"
    copied_cache(prepared_env, cache)
    env = {**prepared_env, "AUTORESEARCH_CACHE": str(cache)}
    record_path, seed_path = cache / "prepared.json", cache / "offline_seed"
    seed, record = seed_path.read_text().strip(), json.loads(record_path.read_text())
    assert len(seed) >= 32 and oct(seed_path.stat().st_mode & 0o777) == "0o600"
    assert record["offline_selection"] == selection_digest(seed) != selection_digest("0")
    val = list_shards(cache / "data")[-1]
    pinned = val.read_bytes()

    val.write_bytes(pinned[:100])
    done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline"], env, repo_root)
    assert done.returncode == 0 and "Repairing" in done.stdout, done.stdout + done.stderr
    assert val.read_bytes() == pinned and json.loads(record_path.read_text())["val_shard"] == record["val_shard"]

    record_path.write_text(json.dumps({k: v for k, v in record.items() if k != "offline_selection"}))
    seed_path.unlink()
    done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline"], env, repo_root)
    assert done.returncode == 0 and "offline selection was public" in done.stdout, done.stdout + done.stderr
    redrawn = json.loads(record_path.read_text())
    assert redrawn["offline_selection"] == selection_digest(seed_path.read_text().strip()) != record["offline_selection"]
    assert redrawn["val_shard"]["sha256"] != record["val_shard"]["sha256"] and "tokenizer ready" in done.stdout

    node_cache = with_the_peak(prepared_env, tmp_path / "node-cache")
    done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline"], {**env, "AUTORESEARCH_CACHE": str(node_cache)},
               repo_root, AUTORESEARCH_OFFLINE_SEED=seed)
    assert done.returncode == 0, done.stderr
    assert list_shards(node_cache / "data")[-1].read_bytes() == pinned


def test_a_cache_on_the_cpu_clock_keeps_it_until_forced(prepared_env, repo_root, tmp_path):
    """The CPU profile's clock became "flops"; a research branch set up on a cache that recorded
    "cpu" goes on with "cpu", so its results stay comparable, and --force switches."""
    cache = tmp_path / "cache"
    copied_cache(prepared_env, cache)
    env = {**prepared_env, "AUTORESEARCH_CACHE": str(cache)}
    record_path = cache / "prepared.json"
    flops = json.loads(record_path.read_text())
    assert flops["budget_clock"] == "flops" and flops["flops_per_budget_second"] > 1e8
    old = {k: v for k, v in flops.items() if k != "flops_per_budget_second"} | {"budget_clock": "cpu"}
    record_path.write_text(json.dumps(old))
    done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline"], env, repo_root)
    assert done.returncode == 0, done.stderr
    assert "Keeping the recorded cpu budget clock" in done.stdout and "--force" in done.stdout
    assert json.loads(record_path.read_text()) == old
    clock = [sys.executable, "-c", "import prepare; print(prepare.BUDGET_CLOCK, prepare.FLOPS_PER_BUDGET_SECOND)"]
    assert subprocess.run(clock, cwd=repo_root, env=env, capture_output=True, text=True).stdout.split() == ["cpu", "None"]

    done = run(["prepare.py", "--profile", "cpu", "--dataset", "offline", "--force"], env, repo_root)
    assert done.returncode == 0, done.stderr
    assert "Calibrating the flops budget clock" in done.stdout
    name, rate = subprocess.run(clock, cwd=repo_root, env=env, capture_output=True, text=True).stdout.split()
    assert name == "flops" and float(rate) == json.loads(record_path.read_text())["flops_per_budget_second"]


def test_user_folder_end_to_end_then_repair_then_force(empty_env, repo_root, text_folder):
    cache = Path(empty_env["AUTORESEARCH_CACHE"])
    done = run(["prepare.py", "--profile", "cpu", "--dataset", str(text_folder)], empty_env, repo_root)
    assert done.returncode == 0, done.stderr
    assert "wrote validation shard" in done.stdout and "tokenizer ready" in done.stdout
    record = json.loads((cache / "prepared.json").read_text())
    assert record["dataset"] == str(text_folder.resolve())
    shards = list_shards(cache / "data")
    first = shards[0].read_bytes()

    shards[0].write_bytes(first[:100])  # damage a shard: the same command repairs it
    done = run(["prepare.py", "--profile", "cpu", "--dataset", str(text_folder)], empty_env, repo_root)
    assert done.returncode == 0, done.stderr
    assert "Repairing" in done.stdout and str(shards[0]) in done.stdout
    assert shards[0].read_bytes() == first  # rebuilt identically: the folder order is deterministic

    done = run(["prepare.py", "--dataset", "offline"], empty_env, repo_root)
    assert done.returncode == 2 and "dataset is" in done.stderr and "--force" in done.stderr
    done = run(["prepare.py", "--dataset", "offline", "--force"], empty_env, repo_root)
    assert done.returncode == 0, done.stderr
    assert json.loads((cache / "prepared.json").read_text())["dataset"] == "offline"


def test_unrecorded_shards_are_not_overwritten(empty_env, repo_root):
    data = Path(empty_env["AUTORESEARCH_CACHE"]) / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["an upstream shard"]}), data / "shard_00000.parquet")
    done = run(["prepare.py", "--dataset", "offline"], empty_env, repo_root)
    assert done.returncode == 2
    assert "Profile: cpu" in done.stdout  # auto-detected on this machine
    assert "no prepare run recorded" in done.stderr and "--force" in done.stderr
    assert (data / "shard_00000.parquet").exists()


def test_missing_folder_is_a_clear_error(empty_env, repo_root, tmp_path):
    done = run(["prepare.py", "--dataset", str(tmp_path / "nowhere")], empty_env, repo_root)
    assert done.returncode == 1 and "neither one of auto, climbmix, tinystories, offline nor a folder" in done.stderr


# ---------------------------------------------------------------------------------------------
# Data set pieces, in process

def test_the_offline_selection_is_its_seeds_and_leaves_out_tests_and_a_third_of_the_library():
    files = offline_source_files("a")
    assert files == offline_source_files("a") and files[:20] != offline_source_files("b")[:20]
    assert all(not (set(p.parts) & OFFLINE_SKIP_DIRS) and not p.name.startswith("test_") for p in files)
    assert sum(p.stat().st_size for p in files) >= OFFLINE_TOTAL_CHARS
    everything = set(offline_source_files("a") + offline_source_files("b") + offline_source_files("c"))
    assert len(files) < 0.75 * len(everything)  # a run that trains on every file it cannot place sees little validation


def test_cut_documents_keeps_every_character_in_bounded_pieces():
    text = "".join(f"def f{i}():\n" + "    x = 1\n" * (i % 50) + "\n\n" for i in range(300)) + "y" * 2500
    pieces = list(cut_documents(text, 768))
    assert "".join(pieces) == text + "\n\n"
    assert all(0 < len(piece) <= 768 for piece in pieces)


def test_folder_documents_in_sorted_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("from b")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skipped.txt").write_text("not data")
    (tmp_path / "a.jsonl").write_text('{"text": "from a, line 1"}\n\n{"text": "from a, line 2"}\n')
    assert [doc.strip() for doc in folder_documents(tmp_path, 1000)] == ["from a, line 1", "from a, line 2", "from b"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl line 2: expected a JSON object with a string \"text\""):
        list(folder_documents(tmp_path, 1000))


def test_a_jsonl_file_that_is_not_utf8_reads_as_a_txt_file_does_or_names_its_line(tmp_path):
    """A byte that is not UTF-8 in a .jsonl file raised UnicodeDecodeError from the read of its lines, outside the
    check of each line: prepare.py ended on "'utf-8' codec can't decode byte 0xff in position 15", naming no file.
    Now such bytes read as U+FFFD, as in a .txt file, and a line that is then no JSON is named with its file."""
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    assert [doc.strip() for doc in folder_documents(tmp_path, 1000)] == ["caf\ufffd au lait"]
    (tmp_path / "more.jsonl").write_bytes(b'{"text": "fine"}\n\xff\xfe binary\n')
    with pytest.raises(ValueError, match=r"more.jsonl line 2: expected a JSON object with a string \"text\""):
        list(folder_documents(tmp_path, 1000))


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .txt, .jsonl or .parquet files"):
        list(folder_documents(tmp_path, 1000))


def test_small_corpus_keeps_most_text_for_training(tmp_path):
    notes = []
    documents = [f"document {i} " * 10 for i in range(1000)]
    shards = write_corpus(iter(documents), val_chars=10**9, directory=tmp_path, report=notes.append)
    texts = [pq.read_table(path)["text"].to_pylist() for path in list_shards(tmp_path)]
    assert shards == len(texts) >= 2 and sorted(text for shard in texts for text in shard) == sorted(documents)  # nothing lost
    assert 0 < sum(map(len, texts[-1])) <= 0.1 * sum(map(len, documents)) + len(documents[0])
    assert "cycle over" in notes[-1]


def test_shards_remember_their_data_set(tmp_path):
    write_corpus(iter(["some text " * 50] * 40), val_chars=500, directory=tmp_path / "ours", source="offline",
                 report=lambda line: None)
    assert {shard_source(path) for path in list_shards(tmp_path / "ours")} == {"offline"}
    pq.write_table(pa.table({"text": ["upstream"]}), tmp_path / "upstream.parquet")
    assert shard_source(tmp_path / "upstream.parquet") == "climbmix"  # upstream shards carry no mark
    (tmp_path / "broken.parquet").write_bytes(b"nonsense")
    assert shard_source(tmp_path / "broken.parquet") is None


def test_the_server_finds_the_cache_where_the_harness_writes_it(monkeypatch, tmp_path):
    """AUTORESEARCH_CACHE=~/... : the server read a literal '~' folder and found nothing prepared."""
    from mcp_server.core import workspace
    from nanochat import cache
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AUTORESEARCH_CACHE", "~/research-cache")
    assert workspace.cache_dir() == cache.cache_dir() == tmp_path / "research-cache"


def test_a_run_finds_the_default_cache_though_the_sandbox_gives_it_another_home(monkeypatch, tmp_path):
    """uv run demo.py with no AUTORESEARCH_CACHE: the sandbox sets HOME=/tmp/home, where the run
    looked for ~/.cache/autoresearch and found nothing prepared (every baseline a crash)."""
    from mcp_server.executors.executor import training_env
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("AUTORESEARCH_CACHE", raising=False)
    assert training_env(tmp_path / "ws")["AUTORESEARCH_CACHE"] == str(tmp_path / ".cache" / "autoresearch")
