"""What users run today: a torch DataLoader whose workers read random patches with OpenSlide.

Same augmentations as the service (our `augment_batch`, on the CPU, in the workers), so that the
comparison measures the data path and not different work.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from loader_service.augment import AugmentConfig, augment_batch, draw_params

__all__ = ["OpenSlidePatches", "augment_collate", "run_dataloader_baseline"]


class OpenSlidePatches(Dataset):  # type: ignore[type-arg]
    """Random ``size``² level-0 patches from a list of slides; each worker opens its own handles."""

    def __init__(self, slides: list[str], size: int = 256, seed: int = 0) -> None:
        self.slides, self.size, self.seed = slides, size, seed
        self.handles: list[Any] | None = None

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> torch.Tensor:
        import openslide

        if self.handles is None:
            self.handles = [openslide.OpenSlide(p) for p in self.slides]
        rng = np.random.default_rng([self.seed, i])
        slide = self.handles[int(rng.integers(len(self.handles)))]
        w, h = slide.dimensions
        x, y = int(rng.integers(0, w - self.size)), int(rng.integers(0, h - self.size))
        return torch.from_numpy(np.array(slide.read_region((x, y), 0, (self.size, self.size)).convert("RGB")))


def augment_collate(items: list[torch.Tensor]) -> torch.Tensor:
    batch = torch.stack(items)
    params = [draw_params(AugmentConfig(), 0, 0, int(k)) for k in range(len(items))]
    return augment_batch(batch, params)


def run_dataloader_baseline(slides: list[str], *, workers: int, seconds: float, batch: int = 64, size: int = 256,
                            augment: bool = True, seed: int = 0) -> dict[str, Any]:
    """Patches/s of the baseline, timed from the first batch on (worker start-up excluded)."""
    torch.set_num_threads(1)
    loader = DataLoader(OpenSlidePatches(slides, size, seed), batch_size=batch, num_workers=workers,
                        collate_fn=augment_collate if augment else None, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        n += next(it).shape[0]
    elapsed = time.perf_counter() - start
    return {"patches_per_s": n / elapsed, "workers": workers, "startup_s": startup}
