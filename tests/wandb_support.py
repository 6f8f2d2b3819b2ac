"""Reading W&B's offline runs back in the tests: wandb 0.31 writes only a run-<id>.wandb file per run
(no summary or config file) and has no reader of it, so this reads the file's framing, LevelDB's
log format after W&B's header, and decodes each record with wandb's own protobuf classes."""
import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B", a 2-byte magic and a version byte
BLOCK = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32c, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The file's protobuf Records in order (CRCs are not checked: W&B just wrote the file)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = HEADER, b""
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        if kind == 0:  # zeroed space: the rest of the block is unused
            pos += left - RECORD_HEADER.size
            continue
        parts += data[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record
    assert parts == b"", f"{path} ends inside a record"


def nested(items, key: str = "key") -> dict:
    """{name: value} from summary or history items (a name is key, or nested_key joined by '/')."""
    return {getattr(i, key) or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


@dataclass
class OfflineRun:
    """What one offline run recorded."""
    folder: Path
    run: object = None  # the RunRecord
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # rows, each {name: value} with _step
    summary: dict = field(default_factory=dict)
    files: set = field(default_factory=set)
    exited: bool = False

    @classmethod
    def read(cls, folder: Path) -> "OfflineRun":
        found = cls(folder)
        (path,) = folder.glob("run-*.wandb")
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.run = record.run
                found.config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "config":
                found.config |= {i.key: json.loads(i.value_json) for i in record.config.update}
            elif kind == "history":
                found.history.append(nested(record.history.item))
            elif kind == "summary":
                found.summary |= nested(record.summary.update)
            elif kind == "files":
                found.files |= {f.path for f in record.files.files}
            elif kind == "exit":
                found.exited = True
        return found

    @property
    def tags(self) -> list[str]:
        return list(self.run.tags)


def offline_runs(folder: Path) -> dict[str, OfflineRun]:
    """The offline runs under a W&B folder, by the description the tracker gave each (its notes)."""
    runs = [OfflineRun.read(f) for f in sorted(folder.glob("offline-run-*")) if f.is_dir()]
    return {r.run.notes: r for r in runs}


class Listener:
    """A port on 127.0.0.1 that counts the connections made to it (a proxy no one should use)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def offline(monkeypatch):
    """W&B as a user who set nothing would have it, every HTTP(S) request sent to a counting proxy."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = Listener()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    yield proxy
    proxy.sock.close()
