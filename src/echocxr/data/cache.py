"""A small on-disk key -> bytes store (one SQLite file) for work a rebuild should not redo.

Used for sentence embeddings (keyed by model and text) and LLM replies (keyed by endpoint model
and prompt). Keys are content hashes, so a changed input or config simply misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path


def content_key(*parts: str) -> str:
    """A stable hash of the parts (unit-separator joined so ("ab", "c") != ("a", "bc"))."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


class DiskCache:
    """Key -> bytes in SQLite; safe to share between runs, written in batches."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        out: dict[str, bytes] = {}
        for i in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[i : i + 500]
            q = f"SELECT k, v FROM kv WHERE k IN ({','.join('?' * len(chunk))})"
            out.update((k, bytes(v)) for k, v in self._db.execute(q, chunk))
        return out

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", items)
        self._db.commit()

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def get_json(self, key: str):
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def put_json(self, key: str, value) -> None:
        self.put(key, json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8"))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
