"""Resumable HTTP downloads: retries, HTTP Range into a .part file, validation, atomic rename.

A dropped connection keeps what arrived; the next attempt asks only for the rest. The final
file appears under its name only once complete and validated, so a crash never leaves a
half file that looks finished.
"""
import os
import time
from pathlib import Path

import requests

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
RETRIES = 5
BACKOFF_S = 1.0  # doubled after each failed attempt
CHUNK_BYTES = 1 << 16  # a dropped connection loses the chunk being read: keep it small
RETRY_STATUS = {408, 429}  # client-side statuses worth retrying; any 5xx is retried too


class DownloadError(RuntimeError):
    """A file could not be downloaded after every retry."""


def _fetch_once(url: str, part: Path, progress) -> None:
    """One attempt: append to part from where it stopped (or start over if the server can't resume)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as r:
        if r.status_code == 416:  # asked past the end: the part is stale, start over
            part.unlink()
            raise requests.RequestException(f"server refused resume at byte {have}; restarting")
        r.raise_for_status()
        if r.status_code != 206:  # server ignored Range: it sends the whole file
            have = 0
        total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        with open(part, "ab" if have else "wb") as f:
            for chunk in r.iter_content(CHUNK_BYTES):
                f.write(chunk)
                have += len(chunk)
                if progress:
                    progress(have, total)
    if total is not None and have != total:
        raise requests.RequestException(f"got {have} of {total} bytes")


def download_file(url: str, dest: Path, validate=None, progress=None, retries: int = RETRIES) -> Path:
    """Download url to dest unless dest already exists; returns dest.

    validate(path) raises on a bad file (checked on the .part before the rename; a bad file is
    deleted and downloaded again). progress(bytes_so_far, total_or_None) is called per chunk.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, progress)
            if validate:
                try:
                    validate(part)
                except Exception:
                    part.unlink()
                    raise
            os.replace(part, dest)
            return dest
        except requests.HTTPError as e:
            if e.response.status_code < 500 and e.response.status_code not in RETRY_STATUS:
                raise DownloadError(f"Could not download {url}: {e}. Check the URL "
                                    f"(or AUTORESEARCH_DATA_URL if you set it).") from e
            error = e
        except Exception as e:  # network errors and validation failures both get another try
            error = e
    raise DownloadError(f"Could not download {url} after {retries} attempts: {error}. "
                        f"Check the network (or the URL), then run the same command again: "
                        f"it resumes from {part.name} where it stopped.")
