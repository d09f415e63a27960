"""SQLite store (WAL), the embedded default.

Join tokens are stored as SHA-256 hashes, never in the clear; a token is consumed
with one conditional UPDATE, so two concurrent joins can't both use its last use.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustmesh.errors import ConfigError
from trustmesh_registry.store import OperatorState, ResourceKey, StoredState

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, name TEXT NOT NULL, document TEXT NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS operator_state (
    agent TEXT PRIMARY KEY, disabled INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL,
    uses_left INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (
    spiffe_id TEXT NOT NULL, instance_id TEXT NOT NULL, address TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, instance_id));
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # one connection; one transaction at a time
        if not path.exists():
            # Create it 0600 before SQLite does: SQLite gives the -wal and -shm files
            # the database file's mode, so they are private from the start too.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open registry database {path}: {e}") from e

    def load(self) -> StoredState:
        state = StoredState()
        for kind, name, doc in self._db.execute("SELECT kind, name, document FROM resources"):
            state.documents[(kind, name)] = json.loads(doc)
        for agent, disabled, reason in self._db.execute(
            "SELECT agent, disabled, reason FROM operator_state"
        ):
            state.operator[agent] = OperatorState(bool(disabled), reason)
        return state

    def write_resources(
        self, puts: Sequence[tuple[ResourceKey, dict[str, Any]]], deletes: Sequence[ResourceKey]
    ) -> None:
        with self._tx():
            self._db.executemany(
                "INSERT INTO resources(kind, name, document) VALUES (?, ?, ?) "
                "ON CONFLICT(kind, name) DO UPDATE SET document = excluded.document",
                [(k, n, json.dumps(doc, sort_keys=True)) for (k, n), doc in puts],
            )
            self._db.executemany("DELETE FROM resources WHERE kind = ? AND name = ?", list(deletes))

    def set_operator_state(self, agent: str, state: OperatorState) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO operator_state(agent, disabled, reason) VALUES (?, ?, ?) "
                "ON CONFLICT(agent) DO UPDATE SET disabled = excluded.disabled, "
                "reason = excluded.reason",
                (agent, int(state.disabled), state.reason),
            )

    def add_join_token(self, token_hash: str, spiffe_id: str, uses: int, expires_at: int) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO join_tokens(token_hash, spiffe_id, uses_left, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (token_hash, spiffe_id, uses, expires_at),
            )

    def consume_join_token(self, token_hash: str, now: int) -> str | None:
        with self._tx():
            cur = self._db.execute(
                "UPDATE join_tokens SET uses_left = uses_left - 1 "
                "WHERE token_hash = ? AND uses_left > 0 AND expires_at > ? RETURNING spiffe_id",
                (token_hash, now),
            )
            row = cur.fetchone()
            self._db.execute(
                "DELETE FROM join_tokens WHERE uses_left <= 0 OR expires_at <= ?", (now,)
            )
        return str(row[0]) if row else None

    def put_endpoint(self, spiffe_id: str, instance_id: str, address: str) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO endpoints(spiffe_id, instance_id, address) VALUES (?, ?, ?) "
                "ON CONFLICT(spiffe_id, instance_id) DO UPDATE SET address = excluded.address",
                (spiffe_id, instance_id, address),
            )

    def delete_endpoint(self, spiffe_id: str, instance_id: str) -> None:
        with self._tx():
            self._db.execute(
                "DELETE FROM endpoints WHERE spiffe_id = ? AND instance_id = ?",
                (spiffe_id, instance_id),
            )

    def load_endpoints(self) -> list[tuple[str, str, str]]:
        rows = self._db.execute("SELECT spiffe_id, instance_id, address FROM endpoints")
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
