"""Downloads against a real HTTP server on 127.0.0.1: dropped connections, Range resume,
servers that ignore Range, bad URLs, invalid files, and prepare.py fetching climbmix shards."""
import http.server
import random
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import download
from nanochat.datasets import (CLIMBMIX_LAST_SHARD, SHARD_PATTERN, TINYSTORIES_FILE, ShardError, check_shard,
                               tinystories_documents)
from nanochat.download import DownloadError, download_file

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable


class FileServer(http.server.ThreadingHTTPServer):
    """Serves self.files by name; drops the first `drops` responses halfway; may ignore Range."""

    def __init__(self, files, drops=0, honour_range=True):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.drops, self.honour_range = files, drops, honour_range
        self.requests = []  # (path, Range header or None)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        if name not in server.files:
            self.send_error(404)
            return
        body, start = server.files[name], 0
        if self.headers.get("Range") and server.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if server.drops > 0:  # promise the whole file, send half, hang up
            server.drops -= 1
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])

    do_HEAD = do_GET


@pytest.fixture
def serve():
    servers = []

    def start(files, **options):
        server = FileServer(files, **options)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)


def parquet_bytes(texts, tmp_path, name="made.parquet") -> bytes:
    path = tmp_path / name
    pq.write_table(pa.table({"text": texts}), path)
    return path.read_bytes()


def test_dropped_connection_resumes_with_range(serve, tmp_path):
    server = serve({"f.bin": PAYLOAD}, drops=1)
    seen = []
    dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", progress=lambda done, total: seen.append(done))
    assert dest.read_bytes() == PAYLOAD
    (_, no_range), (_, resume) = server.requests
    assert no_range is None and resume.startswith("bytes=")
    assert 0 < int(resume.removeprefix("bytes=").rstrip("-")) <= len(PAYLOAD) // 2  # kept what arrived
    assert seen[-1] == len(PAYLOAD) and not (tmp_path / "f.bin.part").exists()


def test_resume_of_a_part_left_by_an_earlier_process(serve, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])
    server = serve({"f.bin": PAYLOAD})
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.requests == [("f.bin", "bytes=1000-")]


def test_server_ignoring_range_restarts_cleanly(serve, tmp_path):
    server = serve({"f.bin": PAYLOAD}, drops=1, honour_range=False)
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_existing_file_is_not_downloaded_again(serve, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"already here")
    server = serve({"f.bin": PAYLOAD})
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin")
    assert server.requests == [] and (tmp_path / "f.bin").read_bytes() == b"already here"


def test_missing_file_fails_at_once_with_advice(serve, tmp_path):
    server = serve({})
    with pytest.raises(DownloadError, match="AUTORESEARCH_DATA_URL"):
        download_file(f"{server.url}/nope.parquet", tmp_path / "nope.parquet")
    assert len(server.requests) == 1 and not (tmp_path / "nope.parquet").exists()


def test_unreachable_server_gives_up_after_retries(tmp_path):
    with pytest.raises(DownloadError, match="after 2 attempts.*run the same command again"):
        download_file("http://127.0.0.1:9/f.bin", tmp_path / "f.bin", retries=2)


def test_persistent_drops_give_up_but_keep_the_part(serve, tmp_path):
    server = serve({"f.bin": PAYLOAD}, drops=10)
    with pytest.raises(DownloadError):
        download_file(f"{server.url}/f.bin", tmp_path / "f.bin", retries=2)
    assert not (tmp_path / "f.bin").exists()
    kept = (tmp_path / "f.bin.part").read_bytes()
    assert len(kept) > len(PAYLOAD) // 2 and PAYLOAD.startswith(kept)  # two partial transfers, joined


def test_invalid_parquet_is_never_renamed_into_place(serve, tmp_path):
    server = serve({"shard.parquet": b"PAR1 but not really parquet"})
    with pytest.raises(DownloadError, match="corrupt or truncated"):
        download_file(f"{server.url}/shard.parquet", tmp_path / "shard.parquet", validate=check_shard, retries=2)
    assert list(tmp_path.iterdir()) == []
    assert len(server.requests) == 2


def test_truncated_shard_is_a_clear_error(tmp_path):
    whole = parquet_bytes(["some text"] * 100, tmp_path)
    damaged = tmp_path / "shard_00000.parquet"
    damaged.write_bytes(whole[: len(whole) - 10])
    with pytest.raises(ShardError, match=f"{damaged}.*corrupt or truncated.*uv run prepare.py"):
        check_shard(damaged)


def test_prepare_downloads_climbmix_from_the_configured_url(serve, tmp_path, repo_root):
    """prepare.py end to end on 'climbmix' from a loopback mirror, one drop included, reusing a
    shard already in an upstream-style cache."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    files = {SHARD_PATTERN.format(i): parquet_bytes([" ".join(rng.choices(words, k=80)) for _ in range(1000)],
                                                    tmp_path, f"{i}.parquet")
             for i in (0, CLIMBMIX_LAST_SHARD)}
    server = serve(files, drops=1)
    data = tmp_path / "cache" / "data"
    data.mkdir(parents=True)
    (data / SHARD_PATTERN.format(0)).write_bytes(files[SHARD_PATTERN.format(0)])
    # eager: the compiler's once-per-machine step (half a minute on 2 cores) is test_compile.py's
    env = {"AUTORESEARCH_CACHE": str(tmp_path / "cache"), "AUTORESEARCH_DATA_URL": server.url,
           "PATH": "/usr/bin:/bin", "AUTORESEARCH_COMPILE": "0"}
    command = [sys.executable, "prepare.py", "--profile", "cpu", "--dataset", "climbmix", "--num-shards", "1"]
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "downloaded" in done.stdout and "already here" in done.stdout and "tokenizer ready" in done.stdout
    assert {name for name, _ in server.requests} == {SHARD_PATTERN.format(CLIMBMIX_LAST_SHARD)}
    assert sorted(p.name for p in data.iterdir()) == sorted(files)
    assert all((data / name).read_bytes() == body for name, body in files.items())

    val = data / SHARD_PATTERN.format(CLIMBMIX_LAST_SHARD)  # a shard broken later is fetched again
    val.write_bytes(val.read_bytes()[:500])
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Repairing" in done.stdout and "is unreadable, downloading it again" in done.stdout
    assert val.read_bytes() == files[val.name]


def test_tinystories_file_becomes_documents(serve, tmp_path, monkeypatch):
    stories = [f"Once upon a time, story {i} happened." for i in range(50)]
    body = "\n<|endoftext|>\n".join(stories).encode()
    server = serve({TINYSTORIES_FILE: body}, drops=1)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    assert list(tinystories_documents(server.url)) == stories
    assert (tmp_path / "downloads" / TINYSTORIES_FILE).read_bytes() == body


@pytest.fixture
def prepare_module(prepared_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", prepared_env["AUTORESEARCH_CACHE"])
    import prepare
    return prepare


def test_auto_dataset_is_climbmix_on_a_gpu_only_when_the_network_answers(serve, prepare_module, monkeypatch):
    server = serve({})  # any HTTP answer counts, even 404: the network is there
    monkeypatch.setenv("AUTORESEARCH_DATA_URL", server.url)
    assert prepare_module.choose_dataset("auto", "h100", None) == "climbmix"
    assert prepare_module.choose_dataset("auto", "cpu", None) == "offline"
    assert prepare_module.choose_dataset("auto", "h100", {"dataset": "tinystories"}) == "tinystories"
    monkeypatch.setenv("AUTORESEARCH_DATA_URL", "http://127.0.0.1:9")  # nothing listens there
    assert prepare_module.choose_dataset("auto", "gpu", None) == "offline"

