"""The miner's side of the one dataset store (minehead.dataset_store): a `dataset` field is a
folder under the allowed roots, or "datasets/{id}", a dataset uploaded to the head service,
fetched from it once and kept here by id.

Before, a dataset uploaded for `heads train` could not be mined at all, and mining a folder the
miner may not read just failed: now an upload serves training, mining and drafting alike.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from minehead import dataset_store
from minehead.client.heads import HeadClient
from minehead.core.errors import FailedPrecondition, NotFound
from minehead.core.paths import resolve_allowed


class DatasetResolver:
    """resolve(ref) -> a dataset folder this process may read."""

    def __init__(self, head_address: str, allowed_roots: list[Path], cache_dir: Path) -> None:
        self.head_address = head_address
        self.allowed_roots = allowed_roots
        self.cache_dir = cache_dir
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def resolve(self, ref: str) -> Path:
        """A folder path must lie under the allowed roots (PERMISSION_DENIED names them); a
        "datasets/{id}" name is fetched from the head service the first time (NOT_FOUND when it has
        no such dataset) and unpacked with the upload's hostile-zip checks. Names are content
        addresses, so the local copy is never stale."""
        if not dataset_store.is_name(ref):
            return resolve_allowed(ref, self.allowed_roots)
        did = dataset_store.dataset_id(ref)
        target = self.cache_dir / did
        if target.is_dir():
            return target
        with self._guard:
            lock = self._locks.setdefault(did, threading.Lock())
        with lock:  # one fetch per id, however many jobs ask at once
            if target.is_dir():
                return target
            try:
                with HeadClient(self.head_address) as c:
                    data = c.export_dataset(f"{dataset_store.PREFIX}{did}")
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(f"dataset {ref!r}: the head service has none by that name "
                                   "(upload it with `minehead datasets upload` or give a folder)") from None
                raise FailedPrecondition(f"dataset {ref!r}: head service at {self.head_address} answered "
                                         f"{e.code().name}: {e.details()}") from None
            return dataset_store.unpack(data, self.cache_dir, did)
