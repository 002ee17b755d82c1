"""Batched JPEG tile decode with ``torchvision.io.decode_jpeg``: nvJPEG on a CUDA device, the
same call with ``device="cpu"`` (libjpeg-turbo) elsewhere, and the choice between it and the
per-tile :class:`DecodePool` path.

A region read gathers the cache misses of its JPEG tiles and hands them to
:meth:`BatchedJpegDecoder.decode` in one call. Each tile becomes a complete stream first (the
file's JPEGTables spliced in; an Adobe APP14 marker with transform 0 inserted for TIFF
PhotometricInterpretation RGB, as for simplejpeg/PIL in ``codecs.py``). The code is the same for
every device; only ``device`` differs, so CPU tests check the pixels of the GPU code path.

Only full-resolution, 3-sample JPEG tiles are batched: ``decode_jpeg`` cannot DCT-scale, so
reduced-scale reads (1/2, 1/4, 1/8) stay on the CPU pool, as do grey JPEG and other codecs.

torch and torchvision are imported lazily: nothing here touches them for ``jpeg_backend='cpu'``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .codecs import TileDecoder, add_adobe_rgb_marker, splice_jpeg_tables

__all__ = [
    "JPEG_BACKENDS",
    "BatchedJpegDecoder",
    "BatchedDecodeUnsupported",
    "JpegBackendChoice",
    "JpegBackendSelector",
    "batchable",
    "jpeg_stream",
    "cuda_device_for",
]

log = logging.getLogger(__name__)

#: ``cpu``: per-tile decode on the DecodePool threads; ``nvjpeg``: batched decode on the GPU;
#: ``auto``: nvjpeg when CUDA is there and it measured faster on the first JPEG slide opened;
#: ``batched-cpu``: the batched code with ``device='cpu'`` (for tests and comparisons)
JPEG_BACKENDS = ("auto", "cpu", "nvjpeg", "batched-cpu")
#: a batched decode whose first tile of a colour kind differs from the CPU decoder by more than
#: this mean absolute difference is not trusted for that kind (e.g. a decoder that ignores the
#: Adobe RGB marker: mean error of tens). nvJPEG's IDCT/chroma upsampling differ from libjpeg-turbo
#: by less than this (torchvision's own nvJPEG test allows a mean difference < 2)
COLOUR_CHECK_MEAN = 2.0
_PHOTOMETRIC_RGB = 2
_PROBE_TILES = 32
_PROBE_CHUNK = 4  # a 256² patch on 256² tiles touches ~4 tiles: the batch size reads really make


class BatchedDecodeUnsupported(RuntimeError):
    """The batched decoder cannot be trusted for these tiles; decode them on the CPU path."""


def batchable(decoder: TileDecoder, scale: int) -> bool:
    """True when tiles of this level at this scale can go through the batched decoder."""
    return decoder.compression == 7 and decoder.samples_per_pixel == 3 and scale == 1


def jpeg_stream(decoder: TileDecoder, data: bytes) -> bytes:
    """A complete JPEG stream for one tile: JPEGTables spliced in, Adobe marker for RGB tiles."""
    stream = splice_jpeg_tables(decoder.jpeg_tables, data)
    if decoder.photometric == _PHOTOMETRIC_RGB:
        stream = add_adobe_rgb_marker(stream)
    return stream


def cuda_device_for(device: str) -> str | None:
    """The CUDA device the batched decoder would use for the service's ``device`` setting, or None
    when that setting keeps work off the GPU ('cpu') or no CUDA device is available."""
    if device == "cpu":
        return None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    return device if device.startswith("cuda:") else "cuda"


class _Request:
    """One caller's tiles waiting for (or done by) a batched decode."""

    __slots__ = ("decoder", "payloads", "tiles", "error")

    def __init__(self, decoder: TileDecoder, payloads: list[bytes]) -> None:
        self.decoder = decoder
        self.payloads = payloads
        self.tiles: list[np.ndarray] | None = None
        self.error: BaseException | None = None


class BatchedJpegDecoder:
    """Decodes many JPEG tiles in one ``torchvision.io.decode_jpeg(list, device=...)`` call.

    Thread-safe. With ``coalesce`` (default on a GPU) concurrent callers are merged "group commit"
    style: while one batch decodes, new requests queue; the next caller to get the decoder takes
    the whole queue as one batch. No timer, no added latency when idle; batches grow under load
    (one region read alone misses ~4 tiles, too few to keep nvJPEG busy). torchvision serialises
    CUDA decodes anyway. Results are host uint8 (h, w, 3) arrays, one buffer per tile.
    """

    def __init__(self, device: str = "cpu") -> None:
        import torch

        self.device = str(torch.device(device))
        # torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec) with a
        # DeprecationWarning per call; Python's default filters hide it outside __main__
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        on_gpu = torch.device(device).type != "cpu"
        #: gather a batch into one host transfer (default: non-CPU device; settable for tests)
        self.one_copy = on_gpu
        #: merge concurrent callers into one decode call (default: non-CPU device; settable)
        self.coalesce = on_gpu
        self._trusted: dict[bool, bool] = {}  # rgb_source -> checked against the CPU decoder
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        self._queue_lock = threading.Lock()
        self._decode_lock = threading.Lock()

    def decode(self, decoder: TileDecoder, payloads: Sequence[bytes]) -> list[np.ndarray]:
        """Decode the raw tile bytes of one level; raises the decoder's error on corrupt data and
        :class:`BatchedDecodeUnsupported` when the first check against the CPU decoder failed."""
        if not payloads:
            return []
        if not batchable(decoder, 1):
            raise BatchedDecodeUnsupported(f"{decoder.name} tiles with {decoder.samples_per_pixel} samples are not batched")
        kind = decoder.photometric == _PHOTOMETRIC_RGB
        trusted = self._trusted.get(kind)
        if trusted is False:
            raise BatchedDecodeUnsupported(f"{self.device} decode of {'RGB' if kind else 'YCbCr'} JPEG failed its check")
        req = _Request(decoder, list(payloads))
        if self.coalesce:
            with self._queue_lock:
                self._queue.append(req)
            with self._decode_lock:
                if req.tiles is None and req.error is None:  # nobody took it along: take the queue
                    with self._queue_lock:
                        batch, self._queue = self._queue, []
                    self._run(batch)
        else:
            self._run([req])
        if req.error is not None:
            raise req.error
        assert req.tiles is not None
        if trusted is None:
            self._check(decoder, kind, req.payloads[0], req.tiles[0])
        return req.tiles

    def _run(self, batch: list[_Request]) -> None:
        """Decode every request's tiles in one call; when that fails and several requests were
        merged, decode each request alone so only the one with the bad tile gets the error."""
        import torch

        try:
            streams = [jpeg_stream(r.decoder, p) for r in batch for p in r.payloads]
            outs = self._decode_jpeg(
                [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams], mode=self._rgb, device=self.device
            )
            # (3, h, w) -> (h, w, 3): a free view on the CPU (libjpeg writes HWC), a kernel on the GPU
            hwc = [o.permute(1, 2, 0).contiguous() for o in outs]
            if self.one_copy:  # one device->host copy for the batch, then a buffer per tile
                flat = torch.cat([h.reshape(-1) for h in hwc]).cpu().numpy()
                arrays, start = [], 0
                for h in hwc:
                    arrays.append(flat[start : start + h.numel()].reshape(tuple(h.shape)).copy())
                    start += h.numel()
            else:
                arrays = [h.numpy() for h in hwc]
        except Exception as err:  # noqa: BLE001 - handed to the caller(s)
            if len(batch) == 1:
                batch[0].error = err
            else:
                for r in batch:
                    self._run([r])
            return
        start = 0
        for r in batch:
            mine, start = arrays[start : start + len(r.payloads)], start + len(r.payloads)
            try:
                r.tiles = [r.decoder.to_rgb(a) for a in mine]
            except Exception as err:  # noqa: BLE001 - e.g. a tile larger than the level's tiles
                r.error = err

    def _check(self, decoder: TileDecoder, kind: bool, payload: bytes, tile: np.ndarray) -> None:
        diff = np.abs(decoder.decode(payload).astype(np.int16) - tile.astype(np.int16))
        mean, worst = float(diff.mean()), int(diff.max())
        with self._lock:
            ok = mean <= COLOUR_CHECK_MEAN
            self._trusted[kind] = ok
        name = "RGB (Adobe marker)" if kind else "YCbCr"
        if ok:
            log.debug("batched JPEG decode on %s: %s tiles agree with the CPU decoder (mean diff %.3f, max %d)", self.device, name, mean, worst)
            return
        log.warning(
            "batched JPEG decode on %s differs from the CPU decoder on %s tiles (mean diff %.2f > %.1f, max %d): "
            "those tiles are decoded on the CPU pool",
            self.device, name, mean, COLOUR_CHECK_MEAN, worst,
        )
        raise BatchedDecodeUnsupported(f"{self.device} decode of {name} JPEG differs from the CPU decoder (mean {mean:.2f})")


@dataclass(frozen=True)
class JpegBackendChoice:
    """What a DecodePool uses for full-resolution JPEG tiles, and why."""

    backend: str  # 'cpu' | 'nvjpeg' | 'batched-cpu'
    reason: str
    device: str | None = None
    cpu_tiles_per_s: float | None = None
    batched_tiles_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("cpu", "nvjpeg", "batched-cpu"):
            raise ValueError(f"backend must be cpu, nvjpeg or batched-cpu, got {self.backend!r}")


def time_backends(
    decoder: TileDecoder, tiles: Sequence[bytes], batched: BatchedJpegDecoder, threads: int, *, chunk: int = _PROBE_CHUNK, repeats: int = 3
) -> tuple[float, float]:
    """(per-tile CPU decode, batched decode) in tiles/s: chunks of ``chunk`` tiles mapped on
    ``threads`` threads, as concurrent region reads would issue them; best of ``repeats``."""
    chunks = [list(tiles[i : i + chunk]) for i in range(0, len(tiles), chunk)]

    def cpu(c: list[bytes]) -> None:
        for t in c:
            decoder.decode(t)

    def gpu(c: list[bytes]) -> None:
        batched.decode(decoder, c)

    rates = []
    with ThreadPoolExecutor(threads, thread_name_prefix="jpeg-probe") as ex:
        for fn in (cpu, gpu):
            fn(chunks[0])  # warm-up (nvJPEG initialisation, first CUDA allocations)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(ex.map(fn, chunks))
                best = min(best, time.perf_counter() - t0)
            rates.append(len(tiles) / best)
    return rates[0], rates[1]


class JpegBackendSelector:
    """Resolves a DecodePool's ``jpeg_backend`` setting; ``auto`` with CUDA waits for real tiles."""

    def __init__(self, setting: str, device: str, threads: int) -> None:
        if setting not in JPEG_BACKENDS:
            raise ValueError(f"jpeg_backend must be one of {JPEG_BACKENDS}, got {setting!r}")
        self.setting = setting
        self.threads = threads
        self._lock = threading.Lock()
        self._batched: BatchedJpegDecoder | None = None
        self._choice: JpegBackendChoice | None = None
        self._cuda: str | None = None
        if setting == "cpu":
            self._choice = JpegBackendChoice("cpu", "configured")
        elif setting == "batched-cpu":
            self._batched = BatchedJpegDecoder("cpu")
            self._choice = JpegBackendChoice("batched-cpu", "configured", "cpu")
        elif setting == "nvjpeg":
            if device == "cpu":
                raise ValueError("jpeg_backend 'nvjpeg' decodes on the GPU but device is 'cpu'; set device to auto/cuda or jpeg_backend to auto/cpu")
            cuda = cuda_device_for(device if device.startswith("cuda") else "cuda")
            if cuda is None:
                raise ValueError(
                    "jpeg_backend 'nvjpeg' needs a CUDA device and torch.cuda.is_available() is False here; "
                    "use jpeg_backend 'auto' (picks the CPU pool without CUDA) or 'cpu'"
                )
            self._batched = _checked_decoder(cuda)
            self._choice = JpegBackendChoice("nvjpeg", "configured", cuda)
        else:
            self._cuda = cuda_device_for(device)
            if self._cuda is None:
                why = "device is 'cpu'" if device == "cpu" else "no CUDA device"
                self._choice = JpegBackendChoice("cpu", f"auto: {why}")

    @property
    def choice(self) -> JpegBackendChoice | None:
        """The resolved choice, or None while ``auto`` waits for the first JPEG slide."""
        return self._choice

    @property
    def batched(self) -> BatchedJpegDecoder | None:
        """The batched decoder when it was chosen, else None (per-tile CPU decode)."""
        return self._batched

    def probe(self, decoder: TileDecoder, tiles: Sequence[bytes]) -> JpegBackendChoice:
        """``auto`` with CUDA: time both backends on these tiles and keep the faster (once)."""
        with self._lock:
            if self._choice is not None:
                return self._choice
            assert self._cuda is not None
            try:
                batched = _checked_decoder(self._cuda)
                # the first batched call also runs the colour check (raises if it fails)
                cpu_rate, gpu_rate = time_backends(decoder, tiles, batched, self.threads)
            except Exception as err:  # noqa: BLE001 - any failure means: stay on the CPU
                log.warning("jpeg_backend auto: nvJPEG on %s is not usable (%s); decoding JPEG on the CPU pool", self._cuda, err)
                self._choice = JpegBackendChoice("cpu", f"auto: nvJPEG failed: {err}")
                return self._choice
            use_gpu = gpu_rate > cpu_rate
            self._batched = batched if use_gpu else None
            self._choice = JpegBackendChoice(
                "nvjpeg" if use_gpu else "cpu",
                f"auto: measured on {len(tiles)} tiles in chunks of {_PROBE_CHUNK}, {self.threads} threads",
                self._cuda,
                round(cpu_rate, 1),
                round(gpu_rate, 1),
            )
            log.info(
                "jpeg_backend auto: CPU pool %.0f tiles/s, nvJPEG on %s %.0f tiles/s -> %s",
                cpu_rate, self._cuda, gpu_rate, self._choice.backend,
            )
            return self._choice


def _checked_decoder(device: str) -> BatchedJpegDecoder:
    """A BatchedJpegDecoder on ``device`` that has decoded one small JPEG (fails early and clearly
    when torchvision was built without nvJPEG)."""
    import io

    import torch
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, format="JPEG", quality=95)
    dec = BatchedJpegDecoder(device)
    try:
        out = dec._decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], mode=dec._rgb, device=dec.device)
    except Exception as err:
        raise RuntimeError(f"torchvision.io.decode_jpeg(device={device!r}) failed: {err}") from err
    if tuple(out[0].shape) != (3, 16, 16):
        raise RuntimeError(f"torchvision.io.decode_jpeg(device={device!r}) returned shape {tuple(out[0].shape)}")
    return dec
