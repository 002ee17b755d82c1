"""Clients that never read: the service's RSS with the in-flight memory budget against (practically) without it.

    .venv/bin/python bench/bench_inflight.py --clients 4 --batch 4 --side 1024 --budget-mb 256

Each client opens a gRPC-bytes session of ``batch``×3×``side``² uint8 batches on the synthetic dataset, grants 16
credits and never reads. Side by side in one run: the budget given, then a budget so large it never binds
(what the service did before it had one). Prints idle RSS, peak RSS over 20 s and the budget gauge's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _gauge(url: str, name: str) -> float:
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def measure(budget_mb: int, clients: int, batch: int, side: int, hold_s: float) -> dict[str, float]:
    import grpc

    from trainer_client import LoaderClient, StreamConfig
    from wsi_loader.v1 import loader_pb2 as pb
    from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

    cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--synthetic", "--listen", "127.0.0.1:0",
           "--metrics-port", "0", "--workers", "2", "--device", "cpu", "--max-inflight-mb", str(budget_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    channels, calls = [], []  # keep the calls: a call garbage-collected is cancelled
    release = threading.Event()
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        address = f"127.0.0.1:{info['port']}"
        config = StreamConfig(dataset="synthetic", batch_size=batch, patch_size=side, samples_per_epoch=10**6,
                              augment=False, transport="grpc", credits=16, timeout_s=60)
        with LoaderClient(address) as client, client.stream(
                StreamConfig(**{**config.__dict__, "samples_per_epoch": 4 * batch})) as warm:
            for _ in warm:
                pass
        time.sleep(1.0)
        idle = _rss_mib(proc.pid)
        for _ in range(clients):
            channel = grpc.insecure_channel(address)
            channels.append(channel)

            def requests() -> Iterator[pb.StreamRequest]:
                yield pb.StreamRequest(open=config.open_message(0, 0, 1, 0, pb.GRPC))
                yield pb.StreamRequest(credit=pb.Credit(batches=16))
                release.wait(300)

            call = pb_grpc.LoaderStub(channel).Stream(requests())
            next(call)  # opened; never read again
            calls.append(call)
        peak, held = idle, 0.0
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            peak = max(peak, _rss_mib(proc.pid))
            held = max(held, _gauge(info["metrics"], "wsi_loader_inflight_bytes") / 2**20)
            time.sleep(0.2)
        return {"budget_mib": budget_mb, "idle_rss_mib": idle, "peak_rss_mib": peak, "growth_mib": peak - idle,
                "inflight_gauge_peak_mib": held}
    finally:
        release.set()
        for channel in channels:
            channel.close()
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--hold-s", type=float, default=20.0)
    args = parser.parse_args()
    rows = [measure(b, args.clients, args.batch, args.side, args.hold_s) for b in (args.budget_mb, 1_000_000)]
    print(f"{'budget MiB':>12} {'idle RSS':>9} {'peak RSS':>9} {'growth':>8} {'gauge peak':>11}")
    for r in rows:
        print(f"{r['budget_mib']:>12} {r['idle_rss_mib']:>9.0f} {r['peak_rss_mib']:>9.0f} {r['growth_mib']:>8.0f} "
              f"{r['inflight_gauge_peak_mib']:>11.0f}")
    print(f"growth without a binding budget / with it: {rows[1]['growth_mib'] / max(rows[0]['growth_mib'], 1):.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
