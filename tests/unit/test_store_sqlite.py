"""SqliteStore on a real file: WAL, file modes, atomic writes, join tokens used once."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trustmesh_registry.store import OperatorState
from trustmesh_registry.store_sqlite import SqliteStore

NOW = 1_750_000_000
ID = "spiffe://test.local/agents/alice"
DOC: dict[str, Any] = {"kind": "Agent", "metadata": {"name": "a"}, "spec": {"sponsor": "s"}}


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteStore]:
    with _umask(0o022):  # the usual umask: files would be 0644 unless the store says otherwise
        s = SqliteStore(path)
    try:
        yield s
    finally:
        s.close()


def _rows(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


# -- files -------------------------------------------------------------------------------------


def test_wal_mode_is_on(store: SqliteStore, path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_file_is_0600(store: SqliteStore, path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_wal_files_are_0600(store: SqliteStore, path: Path, suffix: str) -> None:
    store.add_join_token("h", ID, 1, NOW + 60)
    side = path.with_name(path.name + suffix)
    assert side.exists()
    assert stat.S_IMODE(side.stat().st_mode) == 0o600


# -- resources -------------------------------------------------------------------------------------


def _bad_json(store: SqliteStore) -> None:
    store.write_resources([(("Agent", "a"), DOC), (("Agent", "b"), {"x": object()})], [])


def _bad_delete(store: SqliteStore) -> None:
    # the puts are executed, then the malformed delete key fails inside the transaction
    store.write_resources([(("Agent", "a"), DOC), (("Agent", "b"), DOC)], [("AgentBlueprint",)])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("fail", "error"),
    [(_bad_json, TypeError), (_bad_delete, sqlite3.ProgrammingError)],
    ids=["unserialisable-document", "failure-after-the-puts"],
)
def test_write_resources_is_all_or_nothing(
    store: SqliteStore, path: Path, fail: Callable[[SqliteStore], None], error: type[Exception]
) -> None:
    store.write_resources([(("AgentBlueprint", "keep"), DOC)], [])
    with pytest.raises(error):
        fail(store)
    assert set(store.load().documents) == {("AgentBlueprint", "keep")}
    assert _rows(path, "resources") == 1  # and from another connection
    # no transaction was left open: the next write commits
    store.write_resources([(("Agent", "c"), DOC)], [("AgentBlueprint", "keep")])
    assert set(store.load().documents) == {("Agent", "c")}


def test_state_persists_across_reopen(store: SqliteStore, path: Path) -> None:
    store.write_resources([(("Agent", "a"), DOC), (("AgentBlueprint", "bp"), {"k": 1})], [])
    store.set_operator_state("a", OperatorState(True, "incident"))
    store.set_operator_state("a", OperatorState(True, "incident-2"))
    store.add_join_token("h", ID, 2, NOW + 60)
    assert store.consume_join_token("h", NOW) == ID
    store.close()
    reopened = SqliteStore(path)
    try:
        state = reopened.load()
        assert state.documents == {("Agent", "a"): DOC, ("AgentBlueprint", "bp"): {"k": 1}}
        assert state.operator == {"a": OperatorState(True, "incident-2")}
        assert reopened.consume_join_token("h", NOW) == ID  # the second use survived
        assert reopened.consume_join_token("h", NOW) is None
    finally:
        reopened.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- join tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uses", "expires_at", "now", "expected"),
    [
        (1, NOW + 60, NOW, [ID, None]),
        (3, NOW + 60, NOW, [ID, ID, ID, None]),
        (1, NOW, NOW, [None]),
        (1, NOW + 1, NOW, [ID, None]),
        (2, NOW - 1, NOW, [None]),
    ],
    ids=["once", "three-uses", "expires-now", "last-second", "expired"],
)
def test_consume_join_token(
    store: SqliteStore, uses: int, expires_at: int, now: int, expected: list[str | None]
) -> None:
    store.add_join_token("h", ID, uses, expires_at)
    assert [store.consume_join_token("h", now) for _ in expected] == expected


def test_unknown_token_is_refused(store: SqliteStore) -> None:
    store.add_join_token("h", ID, 1, NOW + 60)
    assert store.consume_join_token("other", NOW) is None
    assert store.consume_join_token("h", NOW) == ID


def test_spent_and_expired_tokens_are_deleted(store: SqliteStore, path: Path) -> None:
    store.add_join_token("spent", ID, 1, NOW + 60)
    store.add_join_token("stale", ID, 5, NOW - 1)
    store.add_join_token("live", ID, 5, NOW + 60)
    assert store.consume_join_token("spent", NOW) == ID
    with contextlib.closing(sqlite3.connect(path)) as db:
        left = [r[0] for r in db.execute("SELECT token_hash FROM join_tokens")]
    assert left == ["live"]


def _race(consume: Callable[[int], str | None], threads: int = 8) -> tuple[int, list[str]]:
    barrier = threading.Barrier(threads)
    results: list[str | None] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait(timeout=5)
        try:
            got = consume(i)
        except Exception as e:
            with lock:
                errors.append(repr(e))
            return
        with lock:
            results.append(got)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
    return sum(r is not None for r in results), errors


@pytest.mark.parametrize("uses", [1, 3])
def test_concurrent_consumption_across_connections(
    store: SqliteStore, path: Path, uses: int
) -> None:
    """Eight connections (as eight registry processes would have) race for one token."""
    store.add_join_token("h", ID, uses, NOW + 60)
    stores = [SqliteStore(path) for _ in range(8)]
    try:
        ok, errors = _race(lambda i: stores[i].consume_join_token("h", NOW))
    finally:
        for s in stores:
            s.close()
    assert (ok, errors) == (uses, [])


def test_concurrent_consumption_on_one_store(store: SqliteStore) -> None:
    outcomes = []
    for trial in range(30):  # the race is likely in one trial and all but certain in 30
        store.add_join_token(f"h{trial}", ID, 1, NOW + 60)
        outcomes.append(_race(lambda _i, t=trial: store.consume_join_token(f"h{t}", NOW)))
    assert outcomes == [(1, [])] * 30
