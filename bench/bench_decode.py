"""Decode throughput: the raw JPEG codec ceiling vs the users' OpenSlide+DataLoader baseline vs
our ``Slide.read_region`` on a DecodePool, on one synthetic JPEG pyramidal slide.

    python bench/bench_decode.py --size 16384 --json out/bench_decode.json

(a) codec ceiling: every level-0 tile's raw bytes (read into memory first) decoded on N threads,
    per decoder (imagecodecs/libjpeg-turbo, PIL, simplejpeg when installed, and our TileDecoder)
    -> MP/s, tiles/s and "256² patches/s equivalent" (decoded pixels / 65536). 1 vs 2 threads
    shows whether the decoder releases the GIL.
(b) baseline: torch DataLoader, num_workers=cores, batch 64; each worker opens the slide with
    OpenSlide and reads random 256² level-0 patches.
(b') ours: random 256² level-0 patches with Slide.read_region into a batch buffer, the reads
    submitted to a DecodePool of N threads (no tile cache, and with a warm tile cache).
(c) batched JPEG decode (torchvision.io.decode_jpeg, ``--device cpu`` or ``cuda`` = nvJPEG) vs the
    per-tile pool: raw tiles in chunks of 4 (what a 256² patch read decodes), 64 and all at once,
    chunks mapped on N threads -> tiles/s and ratio; and read_region with jpeg_backend
    batched-cpu/nvjpeg vs cpu. ``--batched-only`` runs just this part:

    python bench/bench_decode.py --size 4096 --threads 1 2 --batched-only --device cpu

Function API (imported by the service benchmark): ``make_bench_slide``, ``run_codec_ceiling``,
``run_openslide_dataloader``, ``run_slide_reads``, ``run_batched_decode``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loader_service.slides import DecodePool, TileCache, available_cores, open_slide  # noqa: E402
from loader_service.slides.batched import BatchedJpegDecoder, time_backends  # noqa: E402
from loader_service.slides.codecs import jpeg_decoders, splice_jpeg_tables  # noqa: E402
from loader_service.slides.tiff import TiffSlide  # noqa: E402
from loader_service.synthetic import write_synthetic_slide  # noqa: E402

__all__ = ["make_bench_slide", "run_codec_ceiling", "run_openslide_dataloader", "run_slide_reads", "run_batched_decode", "main"]

log = logging.getLogger("bench_decode")
PATCH = 256


def make_bench_slide(directory: str | os.PathLike[str], size: int = 16384, *, quality: int = 80, tile: int = 256, seed: int = 0) -> Path:
    """A synthetic JPEG pyramidal slide (reused if already written with these parameters)."""
    path = Path(directory) / f"bench_{size}_q{quality}_t{tile}_s{seed}.tiff"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_suffix(".tmp.tiff")
        write_synthetic_slide(tmp, size, size, seed=seed, tile_size=tile, quality=quality)
        tmp.rename(path)
        log.info("wrote %s in %.1fs (%.0f MiB)", path, time.perf_counter() - t0, path.stat().st_size / 2**20)
    return path


def _tile_payloads(path: Path, max_tiles: int | None) -> tuple[list[bytes], Any]:
    with open_slide(path, backend="tiff") as slide:
        assert isinstance(slide, TiffSlide)
        layout = slide.tile_layout(0)
        n = layout["tiles_across"] * layout["tiles_down"]
        idx = range(n) if max_tiles is None or max_tiles >= n else np.linspace(0, n - 1, max_tiles).astype(int)
        tiles = [t for t in (slide.raw_tile(0, int(i)) for i in idx) if t is not None]
        return tiles, layout["decoder"]


def run_codec_ceiling(
    path: str | os.PathLike[str],
    threads: Sequence[int] | None = None,
    *,
    decoders: Sequence[str] | None = None,
    max_tiles: int | None = 2048,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Decode raw level-0 tiles (already in memory) on N threads; best of ``repeats``.

    Returns one row per (decoder, threads): mp_per_s, tiles_per_s, patch_equiv_per_s.
    """
    tiles, decoder = _tile_payloads(Path(path), max_tiles)
    rgb = decoder.photometric == 2
    tables = decoder.jpeg_tables
    spliced = [splice_jpeg_tables(tables, t) for t in tiles]
    fns: dict[str, tuple[Callable[[bytes], Any], list[bytes]]] = {"ours(TileDecoder)": (decoder.decode, tiles)}
    for name, fn in jpeg_decoders().items():
        fns[name] = ((lambda f: lambda b: f(b, rgb))(fn), spliced)
    if decoders is not None:
        fns = {k: v for k, v in fns.items() if k in decoders or k.startswith("ours") and "ours" in decoders}
    threads = list(threads or range(1, available_cores() + 1))
    px = decoder.tile_width * decoder.tile_height * len(tiles)
    rows = []
    for name, (fn, payload) in fns.items():
        fn(payload[0])
        for n in threads:
            best = float("inf")
            with ThreadPoolExecutor(n) as ex:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in ex.map(fn, payload, chunksize=max(1, len(payload) // (8 * n))):
                        pass
                    best = min(best, time.perf_counter() - t0)
            rows.append({
                "bench": "codec_ceiling",
                "decoder": name,
                "threads": n,
                "tiles": len(payload),
                "seconds": round(best, 4),
                "mp_per_s": round(px / best / 1e6, 1),
                "tiles_per_s": round(len(payload) / best, 1),
                "patch_equiv_per_s": round(px / best / PATCH**2, 1),
            })
            log.info("codec %-18s threads=%-2d %8.1f MP/s", name, n, px / best / 1e6)
    return rows


def _random_boxes(width: int, height: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, width - PATCH, n), rng.integers(0, height - PATCH, n)], axis=1)


class _OpenSlidePatches:
    """Map-style dataset: random 256² level-0 patches read with OpenSlide (opened per worker)."""

    def __init__(self, path: str, boxes: np.ndarray) -> None:
        self.path = path
        self.boxes = boxes
        self._osr: Any = None

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int) -> Any:
        import openslide
        import torch

        if self._osr is None:
            self._osr = openslide.OpenSlide(self.path)
        x, y = self.boxes[i]
        img = self._osr.read_region((int(x), int(y)), 0, (PATCH, PATCH))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img)[..., :3]))


def run_openslide_dataloader(
    path: str | os.PathLike[str], *, workers: int | None = None, batch: int = 64, patches: int = 4096, seed: int = 1
) -> dict[str, Any]:
    """The users' baseline: torch DataLoader(num_workers=cores) over OpenSlide read_region.

    Throughput is measured from the first batch on (worker start-up excluded; reported apart).
    """
    import openslide
    import torch.utils.data

    workers = available_cores() if workers is None else workers
    with openslide.OpenSlide(str(path)) as osr:
        w, h = osr.dimensions
    ds = _OpenSlidePatches(str(path), _random_boxes(w, h, patches, seed))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    for b in it:
        n += b.shape[0]
    t2 = time.perf_counter()
    del first
    return {
        "bench": "openslide_dataloader",
        "workers": workers,
        "batch": batch,
        "patches": n,
        "startup_s": round(t1 - t0, 3),
        "patches_per_s": round(n / (t2 - t1), 1),
    }


def run_slide_reads(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    batch: int = 64,
    patches: int = 4096,
    cache_bytes: int = 0,
    seed: int = 1,
    jpeg_backend: str = "cpu",
    jpeg_device: str = "auto",
) -> dict[str, Any]:
    """Ours: random 256² level-0 patches, Slide.read_region(out=batch[i]) submitted to a DecodePool.

    With ``cache_bytes`` > 0 a TileCache is used and warmed by one untimed pass over the same
    patches (so the row shows the cache-hit path).
    """
    threads = available_cores() if threads is None else threads
    cache = TileCache(cache_bytes) if cache_bytes else None
    with DecodePool(threads, jpeg_backend=jpeg_backend, jpeg_device=jpeg_device) as pool, open_slide(path, cache=cache, pool=pool) as slide:
        w, h = slide.info.dimensions
        boxes = _random_boxes(w, h, patches, seed)
        buf = np.empty((batch, PATCH, PATCH, 3), np.uint8)

        def one_pass() -> float:
            t0 = time.perf_counter()
            for start in range(0, patches, batch):
                chunk = boxes[start : start + batch]
                futs = [pool.submit(slide.read_region, 0, int(x), int(y), PATCH, PATCH, buf[i]) for i, (x, y) in enumerate(chunk)]
                for f in futs:
                    f.result()
            return time.perf_counter() - t0

        if cache is not None:
            one_pass()
        seconds = one_pass()
        stats = cache.stats() if cache is not None else None
    return {
        "bench": "slide_read_region",
        "threads": threads,
        "batch": batch,
        "patches": patches,
        "cache_bytes": cache_bytes,
        "cache_hit_rate": None if stats is None else round(stats.hit_rate, 3),
        "jpeg_backend": jpeg_backend,
        "patches_per_s": round(patches / seconds, 1),
    }


def run_batched_decode(
    path: str | os.PathLike[str],
    threads: Sequence[int],
    *,
    device: str = "cpu",
    chunks: Sequence[int | None] = (4, 64, None),
    max_tiles: int | None = 512,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Per-tile decode on a thread pool vs batched ``decode_jpeg`` on ``device``, raw level-0 tiles
    in memory, in chunks of ``chunk`` tiles (None: all in one call) mapped on N threads."""
    tiles, decoder = _tile_payloads(Path(path), max_tiles)
    batched = BatchedJpegDecoder(device)
    rows = []
    for chunk in chunks:
        size = len(tiles) if chunk is None else chunk
        for n in threads:
            pool_rate, batched_rate = time_backends(decoder, tiles, batched, n, chunk=size, repeats=repeats)
            rows.append({
                "bench": "batched_decode",
                "device": batched.device,
                "chunk": size,
                "threads": n,
                "tiles": len(tiles),
                "pool_tiles_per_s": round(pool_rate, 1),
                "batched_tiles_per_s": round(batched_rate, 1),
                "ratio": round(batched_rate / pool_rate, 2),
            })
            log.info("batched %s chunk=%d threads=%d: pool %.0f, batched %.0f tiles/s", batched.device, size, n, pool_rate, batched_rate)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["bench"] == "batched_decode":
            lines.append(
                f"batched decode_jpeg[{r['device']}] chunk={r['chunk']:<4} threads={r['threads']:<2} pool {r['pool_tiles_per_s']:>8.1f} "
                f"tiles/s  batched {r['batched_tiles_per_s']:>8.1f} tiles/s  ratio {r['ratio']:.2f}"
            )
        elif r["bench"] == "codec_ceiling":
            lines.append(f"codec   {r['decoder']:<18} threads={r['threads']:<2} {r['mp_per_s']:>8.1f} MP/s {r['patch_equiv_per_s']:>9.1f} patch-equiv/s")
        elif r["bench"] == "openslide_dataloader":
            lines.append(f"baseline OpenSlide+DataLoader workers={r['workers']:<2}      {r['patches_per_s']:>9.1f} patches/s (startup {r['startup_s']}s)")
        else:
            cache = f"cache {r['cache_bytes'] >> 20} MiB hit {r['cache_hit_rate']}" if r["cache_bytes"] else "no cache"
            jpeg = r.get("jpeg_backend", "cpu")
            lines.append(f"ours    read_region threads={r['threads']:<2} jpeg={jpeg:<11} {cache:<24} {r['patches_per_s']:>9.1f} patches/s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=16384, help="slide width=height in pixels")
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--dir", type=Path, default=None, help="where to write/reuse the slide (default: a temp dir)")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default 1..cores)")
    ap.add_argument("--max-tiles", type=int, default=2048)
    ap.add_argument("--patches", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores)")
    ap.add_argument("--skip-openslide", action="store_true")
    ap.add_argument("--extra-slide", type=Path, default=None, help="also run the codec ceiling on this (real) slide")
    ap.add_argument("--json", type=Path, default=None, help="also write all rows as JSON here")
    ap.add_argument("--device", default="cpu", help="device of the batched decode_jpeg rows: cpu, cuda or cuda:N (nvJPEG)")
    ap.add_argument("--batched-only", action="store_true", help="run only (c): batched decode vs the per-tile pool")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = make_bench_slide(a.dir or tmp, a.size, quality=a.quality)
        cores = available_cores()
        threads = a.threads or list(range(1, cores + 1))
        batched_backend = "batched-cpu" if a.device == "cpu" else "nvjpeg"
        rows = run_batched_decode(path, threads, device=a.device, max_tiles=min(a.max_tiles, 512))
        for n in threads:
            for backend in ("cpu", batched_backend):
                rows.append(run_slide_reads(path, threads=n, patches=a.patches, jpeg_backend=backend, jpeg_device=a.device))
        if a.batched_only:
            sys.stdout.write(_table(rows) + "\n")
            if a.json:
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps({"slide": {"size": a.size, "quality": a.quality, "tile": 256}, "cores": cores, "rows": rows}, indent=2))
            return 0
        rows += run_codec_ceiling(path, threads, max_tiles=a.max_tiles)
        if a.extra_slide is not None:
            extra = run_codec_ceiling(a.extra_slide, threads, max_tiles=a.max_tiles)
            for r in extra:
                r["decoder"] = f"{r['decoder']}[{a.extra_slide.name}]"
            rows += extra
        if not a.skip_openslide:
            rows.append(run_openslide_dataloader(path, workers=a.workers, patches=a.patches))
        rows.append(run_slide_reads(path, threads=cores, patches=a.patches, cache_bytes=1 << 30))
    base = next((r["patches_per_s"] for r in rows if r["bench"] == "openslide_dataloader"), None)
    if base:
        for r in rows:
            if r["bench"] == "batched_decode":
                continue
            if r["bench"] != "codec_ceiling":
                r["vs_baseline"] = round(r["patches_per_s"] / base, 2)
            else:
                r["vs_baseline"] = round(r["patch_equiv_per_s"] / base, 2)
    result = {"slide": {"size": a.size, "quality": a.quality, "tile": 256}, "cores": cores, "rows": rows}
    sys.stdout.write(_table(rows) + "\n")
    if base:
        sys.stdout.write("ratios vs baseline: " + ", ".join(
            f"{r.get('decoder', r['bench'])}@{r.get('threads', r.get('workers'))}={r['vs_baseline']}" for r in rows if "vs_baseline" in r
        ) + "\n")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
