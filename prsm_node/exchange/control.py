"""Control-socket methods of the model exchange: ``model.publish``, ``model.fetch``,
``model.progress``, ``model.cancel``, ``model.ls``, ``model.info``, ``model.rm``.

``model.fetch`` starts a fetch (or attaches to the running one) and, with ``wait`` (the
default), answers when it ends; with ``wait: false`` it answers at once and the caller polls
``model.progress`` (the CLI does, at 4 Hz, to draw its progress bar). Models are named by their
manifest id (64 hex characters, or a unique prefix of at least 8 for local models), or by
``NAME[:VERSION]``: ``model.fetch`` resolves it through signed DHT name records, else among
local manifests; the methods on local models (``info``, ``rm``, ``progress``, ``cancel``)
among local manifests only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from ..control.server import ControlServer, RequestError, param
from ..shards import Manifest, QuotaExceeded, ShardError, latest_version, parse_ref
from .exceptions import FetchBusy, ModelHalted
from .fetch import Fetch
from .registry import InvalidRecord, decode_record, record_key
from .service import ShardService, manifest_json

MIN_PREFIX = 8
MAX_WAIT = 24 * 3600.0


def _is_hex_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())


class ModelMethods:
    def __init__(self, service: ShardService) -> None:
        self.service = service
        self.store = service.store

    def register(self, server: ControlServer) -> None:
        for name in ("publish", "fetch", "progress", "cancel", "ls", "info", "rm"):
            server.register(f"model.{name}", getattr(self, name))

    # ------------------------------------------------------------ resolving ids and names

    async def _local(self) -> dict[bytes, Manifest]:
        def load() -> dict[bytes, Manifest]:
            out = {}
            for mid in self.store.manifest_ids():
                try:
                    out[mid] = self.store.get_manifest(mid)
                except ShardError:
                    continue
            return out

        return await trio.to_thread.run_sync(load)

    async def _local_id(self, text: str) -> bytes:
        """A stored (or being fetched) model by full id, unique id prefix, or NAME[:VERSION]."""
        lowered = text.lower()
        if len(lowered) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in lowered):
            known = set(await trio.to_thread.run_sync(self.store.manifest_ids)) | set(self.service.fetches)
            matches = [mid for mid in known if mid.hex().startswith(lowered)]
            if len(matches) > 1:
                raise RequestError("invalid_params", f"{lowered} matches {len(matches)} models; give more of the id")
            if matches:
                return matches[0]
        try:
            found = await self._local_named(text)
        except ShardError as exc:
            raise RequestError(
                "invalid_params", f"not a model id (hex, at least {MIN_PREFIX} characters) or NAME[:VERSION]: {exc}"
            ) from None
        if found is None:
            short = len(lowered) < MIN_PREFIX and all(c in "0123456789abcdef" for c in lowered)
            hint = f" (an id prefix needs at least {MIN_PREFIX} hex characters)" if short else ""
            raise RequestError("not_found", f"no local model {text}{hint}")
        return found

    async def _local_named(self, ref: str) -> bytes | None:
        """The stored model named ``NAME[:VERSION]`` (the latest version when none is given;
        of equal ones the newest manifest), or None. Raises ShardError for a malformed ref."""
        name, version = parse_ref(ref)
        local = [(mid, m) for mid, m in (await self._local()).items() if m.name == name]
        if version is None:
            version = latest_version(m.version for _, m in local)
        local = [(mid, m) for mid, m in local if m.version == version]
        return max(local, key=lambda item: item[1].created)[0] if local else None

    async def _resolve(self, ref: str) -> bytes:
        """A manifest id from an id or ``NAME[:VERSION]``."""
        if _is_hex_id(ref):
            return bytes.fromhex(ref)
        try:
            name, version = parse_ref(ref)
        except ShardError as exc:
            raise RequestError("invalid_params", f"not a model id or NAME[:VERSION]: {exc}") from None
        value = await self.service.providers.get_value(record_key(name, version))
        if value is not None:
            try:
                return decode_record(value).manifest_id
            except InvalidRecord:
                pass
        found = await self._local_named(ref)
        if found is None:
            raise RequestError("not_found", f"no model named {ref} (no name record found, none stored here)")
        return found

    # ------------------------------------------------------------ methods

    async def publish(self, params: dict[str, Any]) -> dict[str, Any]:
        path = Path(param(params, "path", str))
        if not path.is_absolute():
            raise RequestError("invalid_params", f"path must be absolute (the daemon reads it): {path}")
        tags = param(params, "tags", list, [])
        if not all(isinstance(t, str) for t in tags):
            raise RequestError("invalid_params", "tags must be strings")
        try:
            return await self.service.publish(
                path,
                name=param(params, "name", str),
                version=param(params, "version", str),
                description=param(params, "description", str, ""),
                license=param(params, "license", str, ""),
                tags=tags,
                metadata=param(params, "metadata", dict, {}),
                chunk_size=param(params, "chunk_size", int, self.service.publish_chunk_size),
            )
        except QuotaExceeded as exc:
            raise RequestError("quota_exceeded", str(exc)) from None
        except ShardError as exc:
            raise RequestError("invalid_model", str(exc)) from None
        except OSError as exc:
            raise RequestError("invalid_params", f"cannot read {path}: {exc}") from None

    async def fetch(self, params: dict[str, Any]) -> dict[str, Any]:
        ref = param(params, "ref", str)
        wait = param(params, "wait", bool, True)
        timeout = param(params, "timeout", float, MAX_WAIT)
        if not 0 < timeout <= MAX_WAIT:
            raise RequestError("invalid_params", f"timeout must be in (0, {MAX_WAIT}] seconds")
        try:
            fetch = self.service.start_fetch(await self._resolve(ref))
        except ModelHalted as exc:
            raise RequestError("halted", str(exc)) from None
        if not wait:
            return fetch.progress()
        with trio.move_on_after(timeout):
            await fetch.done.wait()
        return _outcome(fetch)

    async def _fetch_of(self, params: dict[str, Any]) -> Fetch:
        text = param(params, "id", str)
        mid = bytes.fromhex(text) if _is_hex_id(text) else await self._local_id(text)
        fetch = self.service.fetches.get(mid)
        if fetch is None:
            raise RequestError("not_found", f"no fetch of {mid.hex()} since the node started")
        return fetch

    async def progress(self, params: dict[str, Any]) -> dict[str, Any]:
        return (await self._fetch_of(params)).progress()

    async def cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        fetch = await self._fetch_of(params)
        running = fetch.running
        fetch.cancel()
        if running:
            await fetch.done.wait()
        return {**fetch.progress(), "cancelled": running}

    async def _status(self, mid: bytes, m: Manifest) -> dict[str, Any]:
        present = sum(await trio.to_thread.run_sync(self.store.present, mid))
        complete = await trio.to_thread.run_sync(self.store.is_complete, mid)
        folder = self.store.model_dir(mid)
        fetch = self.service.fetches.get(mid)
        return {
            "chunks_present": present,
            "complete": complete,
            "path": str(folder) if folder.is_dir() else None,
            "fetching": bool(fetch and fetch.running),
            "halted": self.service.is_halted(mid),
        }

    async def ls(self, params: dict[str, Any]) -> dict[str, Any]:
        models = []
        for mid, m in sorted((await self._local()).items(), key=lambda item: (item[1].name, item[1].version)):
            models.append({
                "id": mid.hex(), "name": m.name, "version": m.version, "total_size": m.total_size,
                "chunks": m.chunk_count, **(await self._status(mid, m)),
            })
        st = self.store.statistics()
        return {"models": models, "usage": st.usage, "quota": st.quota}

    async def info(self, params: dict[str, Any]) -> dict[str, Any]:
        mid = await self._local_id(param(params, "id", str))
        try:
            m = await trio.to_thread.run_sync(self.store.get_manifest, mid)
        except ShardError:
            raise RequestError("not_found", f"no manifest {mid.hex()} stored here (yet)") from None
        fetch = self.service.fetches.get(mid)
        return {
            **manifest_json(mid, m),
            "metadata": m.metadata,
            **(await self._status(mid, m)),
            "fetch": fetch.progress() if fetch else None,
        }

    async def rm(self, params: dict[str, Any]) -> dict[str, Any]:
        mid = await self._local_id(param(params, "id", str))
        try:
            freed = await self.service.remove(mid)
        except FetchBusy as exc:
            raise RequestError("busy", str(exc)) from None
        except ShardError as exc:
            raise RequestError("not_found", str(exc)) from None
        return {"id": mid.hex(), "removed": True, "freed_bytes": freed}


def _outcome(fetch: Fetch) -> dict[str, Any]:
    result = fetch.progress()
    if fetch.state == "halted":
        raise RequestError("halted", fetch.error or "model halted by the circuit breaker")
    if fetch.state == "failed":
        raise RequestError(fetch.error_code or "fetch_failed", fetch.error or "fetch failed")
    if fetch.state == "cancelled":
        raise RequestError("cancelled", f"fetch of {result['id']} was cancelled; run it again to resume")
    if fetch.running:
        raise RequestError("timeout", f"fetch of {result['id']} still running ({result['bytes_done']} of "
                                      f"{result['bytes_total']} bytes); `model fetch` again attaches to it")
    return result
