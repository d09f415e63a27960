"""The reconciler's I/O: the Kubernetes API on one side, the registry on the other.

Two seams, each a small Protocol with a real implementation here and in-memory ones in
the tests:
* `CustomResourceSource` lists and watches one kind. `KubeCustomResources` uses the
  official `kubernetes` client (the `k8s` extra), whose calls block, so each kind
  is pumped from its own thread into the event loop.
* `RegistryWriter` gets, applies and deletes documents. `OperatorRegistry` does it
  through `OperatorClient` (mTLS with an operator SVID), one document per Apply, so
  that one bad CR never blocks the others.

`Reconciler.run()` folds listings and events into a `DesiredState`, then, after a short
debounce and at least every `resync` seconds, plans and executes (`sync_once`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from trustmesh.errors import ConfigError, ManifestError, MeshError, NotFoundError
from trustmesh.k8s.reconciler import (
    APPLY_ORDER,
    GROUP,
    PLURALS,
    VERSION,
    Apply,
    Delete,
    DesiredState,
    Document,
    Key,
    Plan,
    WatchExpiredError,
    plan,
)
from trustmesh.operator_client import OperatorClient
from trustmesh.resources import Kind

__all__ = [
    "CustomResourceSource",
    "KubeCustomResources",
    "OperatorRegistry",
    "Reconciler",
    "RegistryWriter",
    "SyncResult",
]

log = logging.getLogger(__name__)


class CustomResourceSource(Protocol):
    def list(self, kind: Kind) -> tuple[list[dict[str, Any]], str]:
        """All CRs of `kind` and the list's resourceVersion."""

    def watch(self, kind: Kind, resource_version: str) -> Iterator[dict[str, Any]]:
        """Raw watch events from `resource_version` on; ends when the server times out."""

    def stop(self) -> None:
        """Make running watches end soon."""


class RegistryWriter(Protocol):
    async def get(self, kind: Kind) -> dict[str, Document] | None:
        """The registry's documents of `kind` by name; None if it can't list that kind."""

    async def apply(self, key: Key, document: Document) -> str:
        """Apply one document; returns the registry's line (`Kind/name created`)."""

    async def delete(self, key: Key) -> None:
        """Delete one resource; raises `NotFoundError` if the registry has none."""


class OperatorRegistry:
    """`RegistryWriter` over the registry's operator API."""

    def __init__(self, client: OperatorClient, *, timeout: float = 30.0) -> None:
        self._client = client
        self._timeout = timeout

    async def get(self, kind: Kind) -> dict[str, Document] | None:
        from trustmesh.v1 import registry_pb2 as rpb

        try:
            resp = await self._client.call(
                lambda s: s.Get(rpb.GetRequest(kind=kind.value), timeout=self._timeout)
            )
        except MeshError as e:
            log.debug("registry can't list %s: %s", kind.value, e.message)
            return None
        docs = [json.loads(j) for j in resp.json]
        return {d["metadata"]["name"]: d for d in docs}

    async def apply(self, key: Key, document: Document) -> str:
        from trustmesh.v1 import registry_pb2 as rpb

        req = rpb.ApplyRequest(
            documents=[
                rpb.ManifestDocument(
                    source=f"k8s:{key[0].value}/{key[1]}", json=json.dumps(document, default=dict)
                )
            ]
        )
        resp = await self._client.call(lambda s: s.Apply(req, timeout=self._timeout))
        return ", ".join(resp.applied)

    async def delete(self, key: Key) -> None:
        from trustmesh.v1 import registry_pb2 as rpb

        req = rpb.DeleteRequest(kind=key[0].value, name=key[1])
        try:
            await self._client.call(lambda s: s.Delete(req, timeout=self._timeout))
        except MeshError as e:
            if e.reason == NotFoundError.reason:
                raise NotFoundError(e.message) from e
            raise


class KubeCustomResources:
    """`CustomResourceSource` over the official client (in-cluster or a kubeconfig)."""

    def __init__(self, *, kubeconfig: str | None = None, watch_timeout: int = 300) -> None:
        try:
            import kubernetes
        except ImportError as e:
            raise ConfigError(
                "the reconciler needs the kubernetes client: pip install 'trustmesh[k8s]'"
            ) from e
        # The client is only partly annotated: treat it as Any at this seam.
        k8s: Any = kubernetes
        try:
            if kubeconfig:
                k8s.config.load_kube_config(config_file=kubeconfig)
            else:
                k8s.config.load_incluster_config()
        except Exception as e:  # the client raises its own ConfigException and OSErrors
            where = kubeconfig or "the pod's service account"
            raise ConfigError(f"cannot load Kubernetes credentials from {where}: {e}") from e
        self._k8s = k8s
        self._api = k8s.client.CustomObjectsApi()
        self._timeout = watch_timeout
        self._watches: set[Any] = set()
        self._lock = threading.Lock()

    def list(self, kind: Kind) -> tuple[list[dict[str, Any]], str]:
        body: dict[str, Any] = self._api.list_cluster_custom_object(GROUP, VERSION, PLURALS[kind])
        return list(body.get("items", [])), str(body.get("metadata", {}).get("resourceVersion", ""))

    def watch(self, kind: Kind, resource_version: str) -> Iterator[dict[str, Any]]:
        api_exception: type[Exception] = self._k8s.client.exceptions.ApiException
        w = self._k8s.watch.Watch()
        with self._lock:
            self._watches.add(w)
        try:
            stream = w.stream(
                self._api.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURALS[kind],
                resource_version=resource_version,
                timeout_seconds=self._timeout,
                allow_watch_bookmarks=True,
            )
            for event in stream:
                yield {"type": event["type"], "object": event["raw_object"]}
        except api_exception as e:
            if getattr(e, "status", None) == 410:
                raise WatchExpiredError(str(getattr(e, "reason", e))) from e
            raise
        finally:
            with self._lock:
                self._watches.discard(w)

    def stop(self) -> None:
        with self._lock:
            for w in self._watches:
                w.stop()


@dataclass(frozen=True, slots=True)
class SyncResult:
    plan: Plan
    done: tuple[str, ...]  # the registry's lines for applies, "Kind/name deleted"
    failed: tuple[tuple[str, str], ...]  # (action, error message)


@dataclass(frozen=True, slots=True)
class _Listed:
    kind: Kind
    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True, slots=True)
class _Event:
    kind: Kind
    event: dict[str, Any]


class Reconciler:
    def __init__(
        self,
        source: CustomResourceSource,
        registry: RegistryWriter,
        *,
        prune: bool = False,
        resync: float = 60.0,
        debounce: float = 0.5,
        retry: float = 5.0,
    ) -> None:
        self.source = source
        self.registry = registry
        self.prune = prune
        self.resync = resync
        self.debounce = debounce
        self.retry = retry
        self.state = DesiredState()
        self._reported: dict[Key, str] = {}

    def feed(self, message: _Listed | _Event) -> None:
        """Fold one listing or watch event into the desired state (bad input is logged)."""
        try:
            if isinstance(message, _Listed):
                self.state = self.state.with_listing(
                    message.kind, message.items, message.resource_version
                )
            else:
                self.state = self.state.with_event(message.kind, message.event)
        except ManifestError as e:
            log.warning("ignoring a Kubernetes object: %s", e.message)

    async def sync_once(self) -> SyncResult:
        observed = {kind: await self.registry.get(kind) for kind in APPLY_ORDER}
        the_plan = plan(self.state, observed, prune=self.prune)
        for key, problem in the_plan.invalid:
            if self._reported.get(key) != problem:  # once per distinct problem, not per pass
                log.warning("%s/%s is not applied: %s", key[0].value, key[1], problem)
        self._reported = dict(the_plan.invalid)
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        for action in the_plan.actions:
            try:
                if isinstance(action, Apply):
                    done.append(await self.registry.apply(action.key, action.document))
                else:
                    await self._delete(action)
                    done.append(f"{action.key[0].value}/{action.key[1]} deleted")
            except MeshError as e:
                failed.append((str(action), e.message))
                log.warning("%s failed: %s", action, e.message)
        for line in done:
            log.info("%s", line)
        return SyncResult(the_plan, tuple(done), tuple(failed))

    async def _delete(self, action: Delete) -> None:
        with contextlib.suppress(NotFoundError):
            await self.registry.delete(action.key)
        self.state = self.state.forget(action.key)

    def _pump(self, kind: Kind, post: Any, stopped: threading.Event) -> None:
        """One kind's list-then-watch loop, in its own thread."""
        version = ""
        while not stopped.is_set():
            try:
                if not version:
                    items, version = self.source.list(kind)
                    post(_Listed(kind, items, version))
                for event in self.source.watch(kind, version):
                    if stopped.is_set():
                        return
                    meta = event.get("object", {}).get("metadata", {})
                    version = str(meta.get("resourceVersion", version)) or version
                    post(_Event(kind, event))
            except WatchExpiredError:
                version = ""  # list again
            except Exception as e:  # the client's own errors: log, wait, list again
                log.warning("watching %s: %s; retrying in %.0fs", PLURALS[kind], e, self.retry)
                version = ""
                stopped.wait(self.retry)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Listed | _Event] = asyncio.Queue()
        stopped = threading.Event()

        def post(message: _Listed | _Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, message)

        threads = [
            threading.Thread(
                target=self._pump, args=(k, post, stopped), daemon=True, name=f"watch-{k.value}"
            )
            for k in APPLY_ORDER
        ]
        for t in threads:
            t.start()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopping}, timeout=self.resync, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    self.feed(getter.result())
                    await asyncio.sleep(self.debounce)  # let a burst of events arrive
                    while not queue.empty():
                        self.feed(queue.get_nowait())
                else:
                    getter.cancel()
                if self.state.ready and not stop.is_set():
                    await self.sync_once()
        finally:
            stopping.cancel()
            stopped.set()
            self.source.stop()
