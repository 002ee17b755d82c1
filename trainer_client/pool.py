"""One rank's stream pulled from a pool of services: its shard split into sub-shards, each served by one of them.

Sub-shard ``j`` of ``K`` of rank ``r`` (of ``W``) is the rank's shard positions ``j, j + K, j + 2K, ...``, i.e. the
global indices ``r + (j + mK)W``. A sub-shard is opened as an elastic-resume session (loader_service's ShardMap):
stage 0 is ``W`` ranks of which every rank but ``r`` read its whole shard and ``r`` read nothing, so what is left
unread is exactly rank ``r``'s shard in order; the session, rank ``j`` of world ``K``, shards that round-robin.
The union of the ``K`` sub-shards is the rank's single-service shard, whatever ``K`` and whatever order the
batches arrive in; the epoch keeps stage 0's layout (``W``), so every global index names the same sample.

Exactly once: a batch counts once it is yielded to the trainer; ``state_dict()`` records each sub-shard's cursor
after its last yielded batch. When a service dies (kill -9, node loss) or drains, its sub-shards reopen on a
survivor at the cursor after the last batch that reached this process whole (batches still on the wire are
read again from the survivor; batches already received are kept). A service that answers again rejoins: one
sub-shard moves back to it at a batch boundary. docs/architecture.md, "Loader pools".
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from torch.utils.data import IterableDataset

from trainer_client.client import LoaderClient, WSIStream, resolve_rank
from trainer_client.config import StreamConfig
from trainer_client.errors import StalledError, UnavailableError

__all__ = ["PoolConfig", "PoolStats", "PoolStream", "resolve_endpoints"]

log = logging.getLogger(__name__)
_END = object()
_FAILOVER = (UnavailableError, StalledError)
_HEALTH = b"wsi_loader.v1.Loader"  # the readiness health service (loader_service/readiness.py)


def resolve_endpoints(endpoints: tuple[str, ...]) -> list[str]:
    """HOST:PORT endpoints as given; ``dns:///NAME:PORT`` (a headless Service) expanded to every address of NAME."""
    resolved: list[str] = []
    for endpoint in endpoints:
        if not endpoint.startswith("dns:"):
            resolved.append(endpoint)
            continue
        host, _, port = endpoint.removeprefix("dns:").lstrip("/").rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            log.warning("cannot resolve pool endpoint %s: %s", endpoint, err)
            continue
        for family, *_, address in sorted(infos, key=lambda info: str(info[4][0])):
            ip = str(address[0])
            name = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if name not in resolved:
                resolved.append(name)
    return resolved


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """The services a rank pulls from: the local one first (shared memory where it can), remote ones after.

    ``endpoints``: HOST:PORT, or ``dns:///NAME:PORT`` resolved to all its addresses (re-resolved when services
    fail and while looking for new ones). ``sub_shards``: how many pieces the rank's shard is cut into (0 = the
    number of endpoints at the start of the epoch; fixed for a resumed state). ``rejoin_interval_s``: how often
    services that failed (and names) are checked again.
    """

    endpoints: tuple[str, ...]
    sub_shards: int = 0
    rejoin_interval_s: float = 1.0
    queue_batches: int = 2  # batches received ahead per sub-shard

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if not self.endpoints:
            raise ValueError("a pool needs at least one endpoint (HOST:PORT or dns:///NAME:PORT)")
        for endpoint in self.endpoints:
            host, sep, port = endpoint.removeprefix("dns:").lstrip("/").rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"pool endpoint {endpoint!r} must be HOST:PORT or dns:///NAME:PORT")
        if not 0 <= self.sub_shards <= 1024:
            raise ValueError(f"sub_shards must be 0..1024 (0 = one per endpoint), got {self.sub_shards}")
        if self.rejoin_interval_s <= 0 or self.queue_batches < 1:
            raise ValueError(f"rejoin_interval_s ({self.rejoin_interval_s}) must be > 0 and queue_batches "
                             f"({self.queue_batches}) >= 1")


@dataclasses.dataclass
class PoolStats:
    """Counters over the stream's life: ``stream.stats``."""

    batches: int = 0
    failovers: int = 0  # sub-shard sessions broken by their service (each reopens on a survivor at its cursor)
    rejoins: int = 0  # services that answered again after failing, or new addresses of a name
    moves: int = 0  # sub-shards moved to a rejoined service
    last_break: str = ""
    batches_by_endpoint: dict[str, int] = dataclasses.field(default_factory=dict)


class _Pool:
    """Endpoints, which are alive, and where each sub-shard is served: shared by the sub-shard threads."""

    def __init__(self, config: PoolConfig, connection: dict[str, Any]) -> None:
        self.config, self._connection = config, connection
        self.lock = threading.Lock()
        self.endpoints = resolve_endpoints(config.endpoints)
        self.dead: set[str] = set()
        self.clients: dict[str, LoaderClient] = {}
        self.home: dict[int, str] = {}
        self.move: set[int] = set()

    def client(self, endpoint: str) -> LoaderClient:
        with self.lock:
            found = self.clients.get(endpoint)
            if found is None:
                found = self.clients[endpoint] = LoaderClient(endpoint, **self._connection)
            return found

    def pick(self, sub: int) -> str | None:
        """The service for ``sub``: its home while alive, else the live one serving fewest sub-shards."""
        with self.lock:
            home = self.home.get(sub)
            if home is not None and home not in self.dead and home in self.endpoints:
                return home
            alive = [e for e in self.endpoints if e not in self.dead]
            if not alive:
                return None
            load = {e: sum(1 for h in self.home.values() if h == e) for e in alive}
            self.home[sub] = min(alive, key=lambda e: (load[e], alive.index(e)))
            return self.home[sub]

    def failed(self, endpoint: str) -> None:
        with self.lock:
            if endpoint not in self.dead:
                self.dead.add(endpoint)
                stale = self.clients.pop(endpoint, None)  # a fresh channel later: none of gRPC's backoff
                if stale is not None:
                    stale.close()

    def check(self, stats: PoolStats) -> None:
        """Re-resolve names, probe failed services; give each one that is ready again a sub-shard back."""
        found = resolve_endpoints(self.config.endpoints)
        with self.lock:
            new = [e for e in found if e not in self.endpoints]
            self.endpoints += new
            candidates = new + [e for e in self.dead if e in self.endpoints]
        for endpoint in candidates:
            if self._ready(endpoint):
                self._rejoin(endpoint, stats)

    def _ready(self, endpoint: str) -> bool:
        """The member's readiness (gRPC health of wsi_loader.v1.Loader): SERVING, not starting or draining.

        Called by hand (no grpc_health dependency on the trainer): HealthCheckRequest{service} in, and
        HealthCheckResponse{status: SERVING} is the two bytes 08 01 out."""
        probe = LoaderClient(endpoint, **self._connection)
        check = probe.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=bytes,
                                          response_deserializer=bytes)
        try:
            answer = check(b"\x0a" + bytes([len(_HEALTH)]) + _HEALTH, timeout=min(2.0, self.config.rejoin_interval_s),
                           metadata=probe.connection.metadata())
            return bool(answer == b"\x08\x01")
        except grpc.RpcError:
            return False
        finally:
            probe.close()

    def _rejoin(self, endpoint: str, stats: PoolStats) -> None:
        with self.lock:
            self.dead.discard(endpoint)
            stats.rejoins += 1
            load: dict[str, list[int]] = {}
            for sub, home in sorted(self.home.items()):
                load.setdefault(home, []).append(sub)
            busiest = max(load.values(), key=len, default=[])
            if len(busiest) > 1 and not any(h == endpoint for h in self.home.values()):
                sub = busiest[-1]
                self.home[sub] = endpoint
                self.move.add(sub)
        log.warning("loader service %s answers again: it rejoins the pool", endpoint)

    def close(self) -> None:
        with self.lock:
            for client in self.clients.values():
                client.close()
            self.clients.clear()


class PoolStream(IterableDataset):  # type: ignore[type-arg]
    """One rank's epoch from a pool of services, as dicts of tensors (``WSIStream``'s, plus ``sub_shard`` and
    ``global_index``). Batches of different sub-shards interleave in arrival order."""

    def __init__(self, config: StreamConfig, pool: PoolConfig | tuple[str, ...] | list[str], *,
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0, **connection: Any) -> None:
        self.config = config
        self.pool_config = pool if isinstance(pool, PoolConfig) else PoolConfig(tuple(pool))
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.epoch = epoch
        self.sub_shards = self.pool_config.sub_shards
        self.cursors: list[int] = []  # per sub-shard: samples yielded (empty: the epoch not started)
        self.stats = PoolStats()
        self._connection = connection
        self._pool: _Pool | None = None
        self._streams: list[WSIStream] = []

    # --- state ---------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursors = epoch, []

    def state_dict(self) -> dict[str, Any]:
        return {"pool": True, "epoch": self.epoch, "rank": self.rank, "world_size": self.world_size,
                "seed": self.config.seed, "dataset": self.config.dataset, "sub_shards": self.sub_shards,
                "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"rank": self.rank, "world_size": self.world_size, "seed": self.config.seed,
                "dataset": self.config.dataset}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"pool state_dict has {key}={state.get(key)!r}, this stream {value!r}: load the "
                                 "state this rank saved, with the same configuration")
        self.epoch, self.sub_shards = int(state["epoch"]), int(state["sub_shards"])
        self.cursors = [int(c) for c in state["cursors"]]

    # --- iteration -----------------------------------------------------------------------------------------
    def _sub_stream(self, pool: _Pool, sub: int, shard_length: int) -> WSIStream:
        job = f"{self.config.job_id}/pool-rank{self.rank}" if self.config.job_id else ""
        config = dataclasses.replace(self.config, job_id=job)
        endpoint = pool.pick(sub) or pool.endpoints[0]
        stream = WSIStream(config, client=pool.client(endpoint), rank=sub, world_size=self.sub_shards,
                           epoch=self.epoch)
        if self.sub_shards == 1:  # the rank's own shard, plain
            stream.rank, stream.world_size = self.rank, self.world_size
        else:
            cursors = [shard_length] * self.world_size
            cursors[self.rank] = 0
            stream._resume = [[self.world_size, cursors]]
        stream.cursor = self.cursors[sub]
        return stream

    def _shard_length(self, pool: _Pool) -> int:
        """The rank's single-service shard length, asked of the first service that answers."""
        errors = []
        for endpoint in list(pool.endpoints):
            config = dataclasses.replace(self.config, transport="grpc", job_id="", credits=1)
            probe = WSIStream(config, client=pool.client(endpoint), rank=self.rank, world_size=self.world_size,
                              epoch=self.epoch)
            try:
                probe._open_session()
                return probe.shard_length
            except _FAILOVER as err:
                errors.append(str(err))
                pool.failed(endpoint)
            finally:
                probe.close_stream()
        raise UnavailableError(f"no service of the pool {list(self.pool_config.endpoints)} answers: "
                               + "; ".join(errors))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pool = self._pool = _Pool(self.pool_config, self._connection)
        try:
            if not pool.endpoints:
                raise UnavailableError(f"the pool {list(self.pool_config.endpoints)} resolves to no address")
            if not self.cursors:
                self.sub_shards = self.sub_shards or len(pool.endpoints)
                self.cursors = [0] * self.sub_shards
            shard_length = self._shard_length(pool) if self.sub_shards > 1 else 0
        except BaseException:
            pool.close()  # the pool's channels must not outlive a failed start
            raise
        out: queue.Queue[tuple[int, int, Any]] = queue.Queue(self.sub_shards * self.pool_config.queue_batches)
        stop = threading.Event()
        streams = [self._sub_stream(pool, j, shard_length) for j in range(self.sub_shards)]
        threads = [threading.Thread(target=self._drive, args=(pool, j, s, out, stop), daemon=True,
                                    name=f"pool-sub{j}") for j, s in enumerate(streams)]
        monitor = threading.Thread(target=self._monitor, args=(pool, stop), daemon=True, name="pool-monitor")
        for thread in (*threads, monitor):
            thread.start()
        try:
            self._streams = streams
            yield from self._merge(out)
        finally:
            stop.set()
            for stream in streams:
                stream.close_stream()
            for thread in (*threads, monitor):
                thread.join(timeout=10)
            pool.close()

    def _merge(self, out: queue.Queue[tuple[int, int, Any]]) -> Iterator[dict[str, Any]]:
        ended = [False] * self.sub_shards
        while not all(ended):
            try:
                sub, cursor, item = out.get(timeout=self.config.timeout_s + self.config.reconnect.deadline_s)
            except queue.Empty as err:
                raise StalledError(f"no batch from the pool {list(self.pool_config.endpoints)} for "
                                   f"{self.config.timeout_s + self.config.reconnect.deadline_s:.0f}s (epoch "
                                   f"{self.epoch}, cursors {self.cursors})") from err
            if item is _END:
                ended[sub] = True
                continue
            if isinstance(item, BaseException):
                raise item
            batch, endpoint = item
            m = batch["index"]
            if self.sub_shards == 1:
                batch["global_index"] = self.rank + m * self.world_size
            else:
                batch["global_index"] = self.rank + (sub + m * self.sub_shards) * self.world_size
            batch["sub_shard"] = sub
            self.cursors[sub] = cursor
            self.stats.batches += 1
            self.stats.batches_by_endpoint[endpoint] = self.stats.batches_by_endpoint.get(endpoint, 0) + 1
            yield batch
        self.epoch, self.cursors = self.epoch + 1, []

    def _put(self, out: queue.Queue[tuple[int, int, Any]], stop: threading.Event, item: tuple[int, int, Any]) -> bool:
        """Hand ``item`` to the trainer's side; False once the stream is closing."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)  # bounded: the trainer's pace is the backpressure
                return True
            except queue.Full:
                continue
        return False

    def _drive(self, pool: _Pool, sub: int, stream: WSIStream, out: queue.Queue[tuple[int, int, Any]],
               stop: threading.Event) -> None:
        """Serve sub-shard ``sub`` to its end: on its home service, on a survivor after a break, moved on rejoin."""
        policy, broke_at, reopen = self.config.reconnect, 0.0, False
        try:
            while not stop.is_set():
                endpoint = pool.pick(sub)
                if endpoint is None:  # every member failed (this sub-shard's or another's break)
                    if not reopen:
                        broke_at, reopen = time.monotonic(), True
                    if policy.attempts == 0 or time.monotonic() - broke_at > policy.deadline_s:
                        raise UnavailableError(f"no service of the pool {list(self.pool_config.endpoints)} answered "
                                               f"for {policy.deadline_s:.0f}s; last break: {self.stats.last_break}")
                    stop.wait(self.pool_config.rejoin_interval_s)  # the monitor brings services back
                    continue
                stream._active = pool.client(endpoint)
                try:
                    call = stream._open_session()
                    if reopen:
                        log.warning("pool: sub-shard %d of rank %d resumed on %s at epoch %d cursor %d", sub,
                                    self.rank, endpoint, stream.epoch, stream.cursor)
                    reopen = False
                    for batch in stream._batches(call):
                        if not self._put(out, stop, (sub, stream.cursor, (batch, endpoint))):
                            return
                        if sub in pool.move:
                            break
                    else:
                        self._put(out, stop, (sub, 0, _END))
                        return
                    with pool.lock:
                        pool.move.discard(sub)
                    self.stats.moves += 1
                    log.warning("pool: sub-shard %d of rank %d moves to %s at cursor %d", sub, self.rank,
                                pool.home.get(sub), stream.cursor)
                except _FAILOVER as err:
                    if stop.is_set():  # this side closed the calls: the stream is closing, nothing broke
                        return
                    self.stats.last_break = f"{endpoint}: {err}"
                    log.warning("pool: service %s broke sub-shard %d of rank %d at cursor %d: %s", endpoint, sub,
                                self.rank, stream.cursor, err)
                    pool.failed(endpoint)
                    self.stats.failovers += 1
                    broke_at = broke_at if reopen else time.monotonic()
                    reopen = True
                finally:
                    stream.close_stream()
        except Exception as err:  # noqa: BLE001 - raised in the trainer's thread, from the queue
            self._put(out, stop, (sub, 0, err))

    def _monitor(self, pool: _Pool, stop: threading.Event) -> None:
        while not stop.wait(self.pool_config.rejoin_interval_s):
            try:
                pool.check(self.stats)
            except Exception as err:  # noqa: BLE001 - the monitor must outlive a failed probe
                log.warning("pool: checking services failed: %s", err)

    def release(self, batch: dict[str, Any]) -> None:
        """Give a shared-memory batch's slot back now (``WSIStream.release``); a no-op for gRPC-bytes batches."""
        sub = batch.get("sub_shard", -1)
        if 0 <= sub < len(self._streams):
            self._streams[sub].release(batch)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
