"""What a rolling update costs a trainer: the gap in its batch stream when its service drains and another
replica takes over, against its ordinary gap between batches; and what an elastic resume costs the service.

Two `loader-service` replicas on loopback; a stream reads from one with the other as its fallback endpoint.
After a warm-up, the first replica is SIGTERMed (it drains and exits) and restarted, so every round moves the
stream to the other one. Printed: the median gap between batches without a break, the gap across the break,
their ratio (medians over the rounds); then the time to lay out the unread rest of an epoch for an elastic
resume (``ShardMap``) at a few epoch lengths.

    python -m bench.bench_reconnect [--rounds 3] [--batches 30]
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import median, service
from loader_service.sampling import ResumeStages, ShardMap
from trainer_client import ReconnectPolicy, StreamConfig, WSIStream


def _gaps(stream_iter: object, n: int) -> list[float]:
    gaps, last = [], time.perf_counter()
    for _ in range(n):
        next(stream_iter)  # type: ignore[call-overload]
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps


def _round(manifest: Path, batches: int) -> tuple[float, float]:
    args = ("--manifest", f"train={manifest}", "--metrics-port", "-1", "--workers", "2", "--device", "cpu",
            "--tissue-cache-dir", str(manifest.parent / ".tissue-cache"))
    with ExitStack() as stack:
        old_port, old = stack.enter_context(service(*args))
        new_port, _ = stack.enter_context(service(*args))
        policy = ReconnectPolicy(endpoints=(f"127.0.0.1:{new_port}",), backoff_s=0.05)
        config = StreamConfig(dataset="train", batch_size=16, patch_size=128, samples_per_epoch=10**6,
                              transport="grpc", credits=4, reconnect=policy)
        with WSIStream(config, endpoint=f"127.0.0.1:{old_port}") as stream:
            it = iter(stream)
            _gaps(it, 10)  # warm-up
            steady = _gaps(it, batches)
            old.send_signal(signal.SIGTERM)
            after = _gaps(it, batches)
            assert stream.stats.reconnects == 1, stream.stats
        return median(steady), max(after)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    from loader_service.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_synthetic_dataset(Path(tmp), n_slides=4, size=2048, seed=7)
        rounds = [_round(manifest, args.batches) for _ in range(args.rounds)]
    steady, broken = median([r[0] for r in rounds]), median([r[1] for r in rounds])
    print(json.dumps({"failover": {"median_gap_s": round(steady, 4), "gap_across_break_s": round(broken, 4),
                                   "ratio": round(broken / steady, 1), "rounds": [list(map(float, r)) for r in rounds]}}))
    for length in (10**5, 10**6, 10**7):
        stages = ResumeStages(((8, tuple(range(100, 108))),))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ShardMap(length, 0, 3, stages)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"elastic_layout": {"epoch_length": length, "seconds": round(median(times), 4)}}))


if __name__ == "__main__":
    main()
