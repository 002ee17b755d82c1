"""A rank pulling from a pool of services on loopback: the union of its sub-shards is the single-service epoch,
a service killed with kill -9 mid-epoch loses and repeats nothing, a restarted one rejoins, the state resumes."""

from __future__ import annotations

import collections
import itertools
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_reconnect import Service
from trainer_client import PoolConfig, PoolStream, ReconnectPolicy, StreamConfig, UnavailableError, WSIStream
from trainer_client.pool import resolve_endpoints

CONFIG = dict(dataset="train", batch_size=4, patch_size=32, samples_per_epoch=96, seed=11, credits=2, timeout_s=60,
              transport="grpc", augment=False)


def _keys(batch: dict[str, Any]) -> list[tuple[str, int, int]]:
    return list(zip(batch["slide_id"], batch["x"].tolist(), batch["y"].tolist()))


def _single(endpoint: str, rank: int = 0, world: int = 1) -> list[tuple[str, int, int]]:
    with WSIStream(StreamConfig(**CONFIG), endpoint=endpoint, rank=rank, world_size=world) as stream:
        return [key for batch in stream for key in _keys(batch)]


@pytest.fixture(scope="module")
def services(dataset_dir: Path) -> Any:
    started = [Service(dataset_dir) for _ in range(3)]
    try:
        yield started
    finally:
        for service in started:
            service.__exit__()


def test_sub_shards_union_is_the_single_service_epoch(services: list[Service]) -> None:
    reference = _single(services[0].endpoint)
    got: list[tuple[str, int, int]] = []
    indices: list[int] = []
    for rank in range(2):
        stream = PoolStream(StreamConfig(**CONFIG), [s.endpoint for s in services], rank=rank, world_size=2)
        for batch in stream:
            got += _keys(batch)
            indices += batch["global_index"].tolist()
        assert stream.epoch == 1 and stream.sub_shards == 3
        assert len(stream.stats.batches_by_endpoint) == 3, "every service served a sub-shard"
    assert sorted(indices) == list(range(96)), "each global index exactly once"
    assert collections.Counter(got) == collections.Counter(reference)


def test_state_dict_records_each_sub_shard_and_resumes(services: list[Service]) -> None:
    reference = collections.Counter(_single(services[0].endpoint))
    endpoints = [s.endpoint for s in services[:2]]
    first = PoolStream(StreamConfig(**CONFIG), endpoints, rank=0, world_size=1)
    got: list[tuple[str, int, int]] = []
    for i, batch in enumerate(first):
        got += _keys(batch)
        if i == 6:
            state = first.state_dict()
            break
    assert len(state["cursors"]) == 2 and sum(state["cursors"]) == len(got)
    second = PoolStream(StreamConfig(**CONFIG), endpoints[::-1], rank=0, world_size=1)
    second.load_state_dict(state)
    got += [key for batch in second for key in _keys(batch)]
    assert collections.Counter(got) == reference


def _resumed(server: Any) -> float:
    with urllib.request.urlopen(server.metrics_endpoint.url, timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(r"^wsi_loader_sessions_resumed_total (\S+)$", text, re.M)
    assert found, "the service exports wsi_loader_sessions_resumed_total"
    return float(found.group(1))


def test_the_service_counts_sessions_opened_mid_epoch(server: Any) -> None:
    endpoint = f"127.0.0.1:{server.port}"
    before = _resumed(server)
    pool = PoolStream(StreamConfig(**{**CONFIG, "transport": "auto"}), [endpoint, endpoint], rank=0, world_size=1)
    batches = [batch for batch in pool]  # the local service: shared memory
    assert len(batches) == 24 and all(batch["slot"] >= 0 for batch in batches[-2:])
    assert sorted(i for batch in batches for i in batch["global_index"].tolist()) == list(range(96))
    assert _resumed(server) == before, "sub-shards opened at cursor 0 are not resumes"
    with WSIStream(StreamConfig(**CONFIG), endpoint=endpoint) as stream:
        stream.load_state_dict({**stream.state_dict(), "cursor": 8})
        assert sum(len(batch["x"]) for batch in stream) == 96 - 8
    assert _resumed(server) == before + 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "drained"])
def test_a_service_lost_mid_epoch_fails_over_and_rejoins(dataset_dir: Path, services: list[Service], sig: int) -> None:
    config = dict(CONFIG, samples_per_epoch=240)
    with WSIStream(StreamConfig(**config), endpoint=services[0].endpoint) as single:
        reference = collections.Counter(key for batch in single for key in _keys(batch))
    victim = Service(dataset_dir)
    pool = PoolConfig((services[0].endpoint, victim.endpoint, services[1].endpoint), rejoin_interval_s=0.2)
    stream = PoolStream(StreamConfig(**config), pool, rank=0, world_size=1)
    got: list[tuple[str, int, int]] = []
    indices: list[int] = []
    revived: Service | None = None
    killed_at = served_before = -1
    try:
        for i, batch in enumerate(stream):
            got += _keys(batch)
            indices += batch["global_index"].tolist()
            if killed_at < 0 and stream.stats.batches_by_endpoint.get(victim.endpoint, 0) >= 2:
                victim.stop(sig)  # its sub-shard is part-way through (SIGTERM: drains, then exits)
                killed_at = i
            if killed_at >= 0 and i == killed_at + 8:
                assert stream.stats.failovers >= 1, "the stream noticed the killed service"
                served_before = stream.stats.batches_by_endpoint[victim.endpoint]
                revived = Service(dataset_dir, victim.port)
                deadline = time.monotonic() + 30
                while stream.stats.rejoins == 0 and time.monotonic() < deadline:
                    threading.Event().wait(0.1)  # the monitor probes every rejoin_interval_s
                assert stream.stats.rejoins >= 1, "the restarted service answered the pool's probe"
    finally:
        if revived is not None:
            revived.__exit__()
        victim.__exit__()
    assert revived is not None, f"the epoch ended before the test could kill and revive a service: {stream.stats}"
    assert stream.stats.moves >= 1, "a sub-shard moved back to the restarted service"
    assert stream.stats.batches_by_endpoint[victim.endpoint] > served_before, "the rejoined service served again"
    assert sorted(indices) == list(range(240)), "no sample lost, none repeated"
    assert collections.Counter(got) == reference


def test_dns_names_resolve_to_every_address() -> None:
    assert resolve_endpoints(("dns:///localhost:5005",))[0] in ("127.0.0.1:5005", "[::1]:5005")
    assert resolve_endpoints(("10.0.0.1:1", "dns:///no-such-host.invalid:1")) == ["10.0.0.1:1"]
    with pytest.raises(ValueError, match="HOST:PORT"):
        PoolConfig(("nohost",))


@pytest.mark.parametrize(("n", "world"), [(24, 1), (24, 2), (24, 3), (96, 4), (30, 5)])
def test_sub_shard_layout_in_closed_form_equals_the_general_one(n: int, world: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The service lays a pool's sub-shard out without materialising the epoch; same indices as the array."""
    from loader_service.sampling import elastic
    from loader_service.sampling.elastic import ResumeStages, ShardMap

    full = n // world
    layouts = []
    for closed_form in (True, False):
        if not closed_form:
            monkeypatch.setattr(elastic, "_one_shard_left", lambda *args: None)
        layout = []
        for rank, cursor, sub_shards in itertools.product(range(world), (0, 1, full - 1), (1, 2, 3, 5)):
            cursors = [full] * world
            cursors[rank] = cursor
            stages = ResumeStages(((world, tuple(cursors)),))
            for sub in range(sub_shards):
                shards = ShardMap(n, sub, sub_shards, stages)
                assert (shards._one_shard is not None) == closed_form
                layout.append([shards.global_index(i) for i in range(shards.shard_length)])
        layouts.append(layout)
    assert layouts[0] == layouts[1]
    monkeypatch.undo()  # an epoch far past what the general layout holds in memory
    huge = ShardMap(10**9, 1, 3, ResumeStages(((4, (0, 250_000_000, 250_000_000, 250_000_000)),)))
    assert huge.shard_length == 83_333_333 and huge.global_index(5) == (1 + 5 * 3) * 4


def test_a_pool_with_no_live_member_gives_up_by_name() -> None:
    dead = ["127.0.0.1:9", "127.0.0.1:7"]  # nothing listens on discard/echo here
    with pytest.raises(UnavailableError, match="no service of the pool"):
        next(iter(PoolStream(StreamConfig(**CONFIG), dead, rank=0, world_size=1)))
    policy = ReconnectPolicy(deadline_s=1.0)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="answered for 1s"):
        next(iter(PoolStream(StreamConfig(**{**CONFIG, "reconnect": policy}), dead[:1], rank=0, world_size=1)))
    assert time.monotonic() - started < 30


def test_a_refused_start_closes_the_pools_channels(services: list[Service]) -> None:
    from trainer_client import LoaderError

    config = StreamConfig(**{**CONFIG, "dataset": "no-such-dataset"})
    stream = PoolStream(config, [s.endpoint for s in services], rank=0, world_size=1)
    with pytest.raises(LoaderError, match="no-such-dataset"):
        next(iter(stream))
    assert stream._pool is not None and not stream._pool.clients, "a failed start must close every channel it opened"
