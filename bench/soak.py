"""Soak: clients open and close sessions with random valid and invalid configurations, disconnect at random and
are killed with `kill -9`, while the service's RSS, open file descriptors, threads and /dev/shm entries are sampled.

    .venv/bin/python bench/soak.py --duration 600 --out docs/soak     # the 10-minute run in docs/reliability.md
    .venv/bin/python bench/soak.py --duration 60                      # what tests/test_soak.py runs

Pass: after warm-up no growth (least-squares slope of RSS, fds and threads under the thresholds printed), no
unexpected outcome (every fault ends with the status it should, the service counts no internal error), the
service's /dev/shm segments all gone once the clients are, and none left after it stops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHM = Path("/dev/shm")
# Growth allowed after warm-up: the least-squares slope of the 10-second minima (the level the service comes
# back to between bursts of batches in flight) times the measured window must stay under these.
RSS_GROWTH_MIB = 32.0
FDS_GROWTH = 4.0
THREADS_GROWTH = 4.0
WINDOW_S = 10.0

# Each fault a client tries, and the statuses it may end with ("OK" = no error).
EXPECTED: dict[str, set[str]] = {
    "read_to_end": {"OK"},
    "close_early": {"OK"},
    "cancel_abruptly": {"CANCELLED", "OK"},  # OK: the epoch ended before the cancel
    "never_read_then_drop": {"CANCELLED"},
    "idle_without_open": {"DEADLINE_EXCEEDED"},
    "idle_then_drop": {"CANCELLED"},
    "shm_session": {"OK"},
    "tiles_view": {"OK"},
    "invalid_patch_size_0": {"INVALID_ARGUMENT"},
    "invalid_mpp_nan": {"INVALID_ARGUMENT"},
    "invalid_mpp_inf": {"INVALID_ARGUMENT"},
    "invalid_mpp_too_coarse": {"OUT_OF_RANGE"},
    "invalid_mpp_too_fine": {"INVALID_ARGUMENT"},
    "invalid_shard_grid": {"INVALID_ARGUMENT"},
    "invalid_dataset": {"NOT_FOUND"},
    "invalid_batch_too_large": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "region_ok": {"OK"},
    "region_mpp_nan": {"INVALID_ARGUMENT"},
    "region_mpp_too_coarse": {"OUT_OF_RANGE"},
    "control": {"OK"},
}
WEIGHTS = {"read_to_end": 3, "close_early": 4, "cancel_abruptly": 3, "never_read_then_drop": 2,
           "idle_without_open": 1, "idle_then_drop": 1, "shm_session": 3, "tiles_view": 1, "region_ok": 2,
           "control": 3, **{k: 1 for k in EXPECTED if k.startswith(("invalid_", "region_mpp"))}}


# --- the client worker (its own process, so that it can be killed with -9) ------------------------------------

def _worker(port: int, seed: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from trainer_client import LoaderClient, StreamConfig
    from wsi_loader.v1 import loader_pb2 as pb
    from wsi_loader.v1 import loader_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    address = f"127.0.0.1:{port}"
    client = LoaderClient(address, timeout_s=60)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 2**20)])
    stub = pb_grpc.LoaderStub(channel)
    slide = next(s for s in stub.DescribeDataset(pb.DescribeDatasetRequest(dataset="train")).slides if s.levels)
    coarsest = slide.mpp * slide.levels[-1].downsample

    def config(**kw: Any) -> StreamConfig:
        values: dict[str, Any] = dict(dataset="train", batch_size=rng.choice([2, 4, 8]),
                                      patch_size=rng.choice([32, 64, 128]), samples_per_epoch=rng.choice([16, 64, 512]),
                                      seed=rng.randrange(1000), augment=rng.random() < 0.5, credits=rng.choice([1, 4, 8]),
                                      transport="grpc", timeout_s=60)
        values.update(kw)
        return StreamConfig(**values)

    def raw(message: pb.OpenSession, *, read: int | None, credit: int = 4, hold_s: float = 0.0) -> str:
        """A raw stream: read ``read`` messages (None: to the end) then cancel; the status it ended with."""
        stop = threading.Event()

        def requests() -> Iterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=message)
            yield pb.StreamRequest(credit=pb.Credit(batches=credit))
            stop.wait(120)

        call = stub.Stream(requests(), timeout=120)
        try:
            for i, _ in enumerate(call):
                if read is not None and i >= read:
                    time.sleep(hold_s)
                    call.cancel()
        except grpc.RpcError as err:
            return err.code().name
        finally:
            stop.set()
        return "OK"

    def session(cfg: StreamConfig, limit: int | None) -> str:
        try:
            with client.stream(cfg) as stream:
                for i, _ in enumerate(stream):
                    if limit is not None and i + 1 >= limit:
                        break
        except Exception as err:  # noqa: BLE001 - the status is the outcome
            code = getattr(err, "code", None)
            return code.name if code is not None else f"{type(err).__name__}: {err}"
        return "OK"

    def invalid(**changes: Any) -> pb.OpenSession:
        message = config().open_message(0, 0, 1, 0, pb.GRPC)
        for key, value in changes.items():
            target = message.view if key in ("grid_rows", "grid_cols", "view", "region_width") else message
            setattr(target, key, value)
        return message

    def idle(drop_after: float | None) -> str:
        hold = threading.Event()

        def silent() -> Iterator[pb.StreamRequest]:
            hold.wait(120)
            return
            yield

        call = stub.Stream(silent(), timeout=120)
        if drop_after is not None:
            threading.Timer(drop_after, call.cancel).start()
        try:
            for _ in call:
                pass
        except grpc.RpcError as err:
            return err.code().name
        finally:
            hold.set()
        return "OK"

    def region(mpp: float) -> str:
        try:
            stub.ReadRegion(pb.ReadRegionRequest(dataset="train", slide_id=slide.slide_id, mpp=mpp, x=rng.randrange(512),
                                                 y=rng.randrange(512), width=64, height=64), timeout=60)
        except grpc.RpcError as err:
            return err.code().name
        return "OK"

    def control() -> str:
        t0 = time.perf_counter()
        stub.ListDatasets(pb.ListDatasetsRequest(), timeout=5)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return "OK" if time.perf_counter() - t0 < 2.0 else "SLOW_CONTROL"

    actions: dict[str, Callable[[], str]] = {
        "read_to_end": lambda: session(config(samples_per_epoch=32), None),
        "close_early": lambda: session(config(samples_per_epoch=4096), rng.randint(1, 6)),
        "cancel_abruptly": lambda: raw(config().open_message(0, 0, 1, 0, pb.GRPC), read=rng.randint(0, 3)),
        "never_read_then_drop": lambda: raw(config(batch_size=8, patch_size=128).open_message(0, 0, 1, 0, pb.GRPC),
                                            read=0, credit=16, hold_s=rng.uniform(0.5, 3.0)),
        "idle_without_open": lambda: idle(None),
        "idle_then_drop": lambda: idle(rng.uniform(0.1, 2.0)),
        "shm_session": lambda: session(config(transport="shm", samples_per_epoch=4096), rng.randint(1, 8)),
        "tiles_view": lambda: session(config(view="tiles", batch_size=1, region_width=256, tile_size=64, overlap=8,
                                             samples_per_epoch=4), rng.choice([None, 5])),
        "invalid_patch_size_0": lambda: raw(invalid(patch_size=0), read=None),
        "invalid_mpp_nan": lambda: raw(invalid(mpp=math.nan), read=None),
        "invalid_mpp_inf": lambda: raw(invalid(mpp=math.inf), read=None),
        "invalid_mpp_too_coarse": lambda: raw(invalid(mpp=coarsest * 1000), read=None),
        "invalid_mpp_too_fine": lambda: raw(invalid(mpp=slide.mpp / 8), read=None),
        "invalid_shard_grid": lambda: raw(invalid(view=pb.SHARD, batch_size=1, region_width=128, grid_rows=999,
                                                  grid_cols=1), read=None),
        "invalid_dataset": lambda: raw(invalid(dataset="no-such-dataset"), read=None),
        "invalid_batch_too_large": lambda: raw(invalid(batch_size=4096, patch_size=1024), read=None),
        "region_ok": lambda: region(slide.mpp * rng.choice([1.0, 1.5, 3.0])),
        "region_mpp_nan": lambda: region(math.nan),
        "region_mpp_too_coarse": lambda: region(coarsest * 1000),
        "control": control,
    }
    names = list(WEIGHTS)
    weights = [WEIGHTS[n] for n in names]
    while True:
        name = rng.choices(names, weights)[0]
        t0 = time.perf_counter()
        outcome = actions[name]()
        print(json.dumps({"fault": name, "outcome": outcome, "s": round(time.perf_counter() - t0, 3)}), flush=True)


# --- the driver -------------------------------------------------------------------------------------------------

def _proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmRSS", "Threads"))}
    return {"rss_mib": int(values["VmRSS"]) / 1024, "threads": int(values["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "shm": len(_service_segments(pid))}


def _service_segments(pid: int) -> list[str]:
    return [p.name for p in SHM.iterdir() if p.name.startswith(f"wsi-loader-{pid}-")]


def _scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def _minima(ts: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """(start, minimum) of each WINDOW_S window."""
    buckets: dict[int, float] = {}
    for t, y in zip(ts, ys):
        k = int(t // WINDOW_S)
        buckets[k] = min(y, buckets.get(k, y))
    keys = sorted(buckets)
    return [k * WINDOW_S for k in keys], [buckets[k] for k in keys]


def _slope(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope, per minute."""
    n = len(ts)
    if n < 3:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


class _Worker:
    def __init__(self, port: int, seed: int, results: Counter[tuple[str, str]], lock: threading.Lock) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--port", str(port), "--seed", str(seed)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self._thread = threading.Thread(target=self._read, args=(results, lock), daemon=True)
        self._thread.start()

    def _read(self, results: Counter[tuple[str, str]], lock: threading.Lock) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            with lock:
                results[(row["fault"], row["outcome"])] += 1

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _start_service(workdir: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    from loader_service.synthetic import write_synthetic_dataset

    manifest = write_synthetic_dataset(workdir / "data", n_slides=4, size=2048, seed=7)
    config = workdir / "service.yaml"
    config.write_text(json.dumps({"credit_timeout_s": 20.0, "open_timeout_s": 5.0, "max_inflight_mb": 256,
                                  "tile_cache_bytes": 64 * 2**20}))  # JSON is YAML
    cmd = [sys.executable, "-m", "loader_service.cli", "serve", "--config", str(config),
           "--manifest", f"train={manifest}", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--workers", "2",
           "--device", "cpu", "--tissue-cache-dir", str(workdir / "tissue")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(workdir / "service.log", "w"), text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the service did not start; see {workdir / 'service.log'}")
    return proc, json.loads(line)


def run(duration: float, clients: int, kill_every: float, warmup: float, out: Path | None, seed: int) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rng = random.Random(seed)
    results: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="wsi-soak-") as tmp:
        service, info = _start_service(Path(tmp))
        pid, port = service.pid, info["port"]
        series: dict[str, list[float]] = defaultdict(list)
        workers = [_Worker(port, seed * 1000 + i, results, lock) for i in range(clients)]
        kills, next_kill, started = 0, time.monotonic() + kill_every, time.monotonic()
        control_max, load_started = 0.0, None  # the clients' first outcome: the run's time counts from there
        try:
            while load_started is None or (now := time.monotonic()) - load_started < duration:
                now = time.monotonic()
                if load_started is None:
                    with lock:
                        if results:
                            load_started = now
                    if now - started > 180:
                        raise RuntimeError("no client reported an outcome within 180 s of starting")
                sample = _proc_sample(pid)
                series["t"].append(now - (load_started or now))
                for key, value in sample.items():
                    series[key].append(value)
                metrics = _scrape(info["metrics"])
                series["inflight_mib"].append(metrics.get("wsi_loader_inflight_bytes", 0.0) / 2**20)
                series["sessions"].append(metrics.get("wsi_loader_active_sessions", 0.0))
                if now >= next_kill:  # kill -9 a client mid-whatever, start another
                    i = rng.randrange(len(workers))
                    workers[i].kill()
                    kills += 1
                    workers[i] = _Worker(port, seed * 1000 + clients + kills, results, lock)
                    next_kill = now + rng.uniform(0.5, 1.5) * kill_every
                t0 = time.perf_counter()
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                control_max = max(control_max, time.perf_counter() - t0)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        finally:
            for w in workers:
                w.kill()
        # The clients are gone: every session ends (cancelled by the OS closing their sockets).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (_scrape(info["metrics"]).get("wsi_loader_active_sessions", 0)
                                               or _service_segments(pid)):
            time.sleep(0.5)
        metrics = _scrape(info["metrics"])
        left_while_serving = _service_segments(pid)
        final = _proc_sample(pid)
        service.send_signal(signal.SIGTERM)
        service_rc = service.wait(timeout=60)
        left_after_stop = _service_segments(pid)
        probes = [p.name for p in SHM.iterdir() if p.name.startswith("wsi-probe-")]
    return _report(series, results, metrics, kills, control_max, warmup, final, left_while_serving, left_after_stop,
                   probes, service_rc, duration, clients, out)


def _report(series: dict[str, list[float]], results: Counter[tuple[str, str]], metrics: dict[str, float], kills: int,
            control_max: float, warmup: float, final: dict[str, float], left_serving: list[str], left_stopped: list[str],
            probes: list[str], service_rc: int, duration: float, clients: int, out: Path | None) -> dict[str, Any]:
    ts = series["t"]  # seconds since the clients' first outcome (samples before it are left out)
    after = [i for i, t in enumerate(ts) if t >= warmup]
    window_min = (ts[-1] - warmup) / 60 if after else 0.0
    slopes = {key: _slope(*_minima([ts[i] for i in after], [series[key][i] for i in after]))
              for key in ("rss_mib", "fds", "threads")}
    limits = {key: growth / max(window_min, 1e-9) for key, growth in
              (("rss_mib", RSS_GROWTH_MIB), ("fds", FDS_GROWTH), ("threads", THREADS_GROWTH))}
    faults: dict[str, dict[str, int]] = defaultdict(dict)
    unexpected = 0
    for (fault, outcome), n in sorted(results.items()):
        faults[fault][outcome] = n
        if outcome not in EXPECTED[fault]:
            unexpected += n
    faults["kill -9 (client process)"] = {"killed": kills}
    internal = metrics.get("wsi_loader_errors_total{kind=internal}", 0.0)
    checks = {
        f"RSS slope < {limits['rss_mib']:.2f} MiB/min ({RSS_GROWTH_MIB:g} MiB over {window_min:.1f} min)":
            slopes["rss_mib"] < limits["rss_mib"],
        f"fds slope < {limits['fds']:.2f}/min": slopes["fds"] < limits["fds"],
        f"threads slope < {limits['threads']:.2f}/min": slopes["threads"] < limits["threads"],
        "no unexpected outcome": unexpected == 0,
        "no internal error counted": internal == 0,
        "no session left open": metrics.get("wsi_loader_active_sessions", 0.0) == 0,
        "in-flight budget all given back": metrics.get("wsi_loader_inflight_bytes", 0.0) == 0,
        "credits gauge back to 0": metrics.get("wsi_loader_credits_available", 0.0) == 0,
        "announced tile reads all withdrawn": metrics.get("wsi_loader_tile_cache_announced_bytes", -1.0) == 0,
        "/dev/shm: service segments gone while serving": not left_serving,
        "/dev/shm: none after stop": not left_stopped,
        "service exited 0 on SIGTERM": service_rc == 0,
    }
    report = {
        "duration_s": duration, "clients": clients, "warmup_s": warmup, "samples": len(ts), "slopes_per_min": slopes,
        "slope_limits_per_min": limits,
        "rss_mib": {"start": series["rss_mib"][0], "after_warmup": series["rss_mib"][after[0]] if after else None,
                    "max": max(series["rss_mib"]), "end": final["rss_mib"]},
        "fds": {"max": max(series["fds"]), "end": final["fds"]}, "threads": {"max": max(series["threads"]),
                                                                            "end": final["threads"]},
        "health_check_max_s": control_max, "faults": faults, "unexpected": unexpected,
        "errors_total": {k.split("=")[1].rstrip("}"): v for k, v in metrics.items()
                         if k.startswith("wsi_loader_errors_total{")},
        "sessions_ended": {k.split("=")[1].rstrip("}"): v for k, v in metrics.items()
                           if k.startswith("wsi_loader_sessions_ended_total{")},
        "sessions_total": metrics.get("wsi_loader_sessions_total", 0.0),
        "client_probes_left": len(probes), "checks": checks, "passed": all(checks.values()),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(report, indent=1))
        (out / "soak_series.json").write_text(json.dumps(series))
        _plot(series, warmup, out / "soak.png")
    return report


def _plot(series: dict[str, list[float]], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x / 60 for x in series["t"]]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    for ax, key, label in zip(axes, ("rss_mib", "fds", "threads", "sessions"),
                              ("service RSS (MiB)", "open fds", "threads", "open sessions / /dev/shm segments")):
        ax.plot(t, series[key], lw=1, label=label)
        if key == "rss_mib":
            ax.plot(t, series["inflight_mib"], lw=1, label="in-flight budget in use (MiB)")
        if key == "sessions":
            ax.plot(t, series["shm"], lw=1, label="service /dev/shm segments")
        ax.axvline(warmup / 60, color="grey", ls="--", lw=0.8)
        ax.axvline(0, color="grey", ls=":", lw=0.8)
        ax.set_ylabel(label.split(" (")[0])
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("minutes since the clients' first outcome (dotted); dashed: end of warm-up")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of load, from the clients' first outcome (default 600)")
    parser.add_argument("--clients", type=int, default=4, help="client processes at once (default 4)")
    parser.add_argument("--kill-every", type=float, default=15.0, help="mean seconds between kill -9 (default 15)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of load left out of the slopes (default: a third, at least 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for soak.json, soak_series.json and soak.png")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.port, args.seed)
        return 0
    report = run(args.duration, args.clients, args.kill_every, args.warmup or max(20.0, args.duration / 3), args.out, args.seed)
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
