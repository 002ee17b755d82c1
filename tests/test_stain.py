"""Stain normalisation: Macenko recovers known stains, Reinhard hits its LAB target, sessions are deterministic."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from loader_service.augment.stain import StainConfig, fit_target, normalise_batch, rgb_to_lab

# Stain vectors (optical density per unit concentration) of a typical H&E (Macenko et al. 2009's reference).
H_REF = np.array([0.5626, 0.7201, 0.4062])
E_REF = np.array([0.2159, 0.8012, 0.5581])
# A differently stained lab: bluer haematoxylin, redder eosin.
H_OTHER = np.array([0.65, 0.70, 0.29])
E_OTHER = np.array([0.30, 0.70, 0.65])
ANGLE_TOLERANCE_DEG = 1.0


def beer_lambert(h: np.ndarray, e: np.ndarray, seed: int, size: int = 192, n: int = 1) -> np.ndarray:
    """uint8 (n, size, size, 3) images I = 240 exp(-(c_H h + c_E e)) with random concentrations."""
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    rng = np.random.default_rng(seed)
    count = n * size * size
    conc = np.stack([rng.uniform(0, 1.5, count) * rng.uniform(0, 1, count) ** 2,
                     rng.uniform(0, 1.0, count) * rng.uniform(0, 1, count) ** 2], axis=1)
    od = conc @ np.stack([h, e])
    return np.clip(np.round(240.0 * np.exp(-od)), 0, 255).astype(np.uint8).reshape(n, size, size, 3)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return float(np.degrees(np.arccos(min(1.0, cos))))


def stains_of(config: StainConfig) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(config.target[:6]).reshape(2, 3)
    return m[0], m[1]


def test_macenko_recovers_the_stain_vectors_of_a_beer_lambert_mixture() -> None:
    for seed, (h, e) in enumerate([(H_REF, E_REF), (H_OTHER, E_OTHER)]):
        fitted = fit_target("macenko", torch.from_numpy(beer_lambert(h, e, seed)))
        fh, fe = stains_of(fitted)
        assert angle_deg(fh, h) < ANGLE_TOLERANCE_DEG, (fh, h)
        assert angle_deg(fe, e) < ANGLE_TOLERANCE_DEG, (fe, e)


def test_macenko_normalised_image_takes_the_target_stains() -> None:
    target = fit_target("macenko", torch.from_numpy(beer_lambert(H_REF, E_REF, 1)))
    source = torch.from_numpy(beer_lambert(H_OTHER, E_OTHER, 2, n=3))
    out = normalise_batch(source, target)
    assert out.shape == source.shape and out.dtype == torch.uint8
    for image in out:
        fh, fe = stains_of(fit_target("macenko", image[None]))
        assert angle_deg(fh, H_REF) < 2 * ANGLE_TOLERANCE_DEG and angle_deg(fe, E_REF) < 2 * ANGLE_TOLERANCE_DEG
    # ... and the source's own stains were far from them: the test could fail.
    fh, _ = stains_of(fit_target("macenko", source[:1]))
    assert angle_deg(fh, H_REF) > 5


def test_reinhard_matches_the_target_lab_mean_and_std() -> None:
    rng = np.random.default_rng(3)
    reference = torch.from_numpy(beer_lambert(H_REF, E_REF, 4))
    target = fit_target("reinhard", reference)
    source = torch.from_numpy(beer_lambert(H_OTHER, E_OTHER, 5, n=2))
    source = (source.float() * torch.from_numpy(rng.uniform(0.85, 1.0, (2, 1, 1, 3)))).to(torch.uint8)
    before = rgb_to_lab(source[0].float() / 255).reshape(-1, 3)
    out = normalise_batch(source, target)
    want_mean, want_std = np.array(target.target[:3]), np.array(target.target[3:])
    assert np.abs(before.mean(0).numpy() - want_mean).max() > 3  # far before
    for image in out:
        lab = rgb_to_lab(image.float() / 255).reshape(-1, 3)
        np.testing.assert_allclose(lab.mean(0).numpy(), want_mean, atol=1.0)
        np.testing.assert_allclose(lab.std(0, correction=0).numpy(), want_std, atol=1.0)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_batchwise_equals_one_by_one_and_layouts_agree(method: str) -> None:
    target = fit_target(method, torch.from_numpy(beer_lambert(H_REF, E_REF, 6)))
    batch = torch.from_numpy(beer_lambert(H_OTHER, E_OTHER, 7, size=64, n=4))
    whole = normalise_batch(batch, target)
    for i in range(4):
        assert torch.equal(normalise_batch(batch[i:i + 1], target)[0], whole[i])
    nchw = normalise_batch(batch.permute(0, 3, 1, 2).contiguous(), target, layout="NCHW")
    assert torch.equal(nchw, whole.permute(0, 3, 1, 2))


def test_blank_images_pass_macenko_unchanged_and_bad_configs_are_refused() -> None:
    target = fit_target("macenko", torch.from_numpy(beer_lambert(H_REF, E_REF, 8)))
    white = torch.full((2, 32, 32, 3), 245, dtype=torch.uint8)
    assert torch.equal(normalise_batch(white, target), white)
    with pytest.raises(ValueError, match="tissue pixels"):
        fit_target("macenko", white)
    with pytest.raises(ValueError, match="8 values"):
        StainConfig("macenko", (1.0, 2.0))
    with pytest.raises(ValueError, match="stain method"):
        fit_target("vahadane", white)


# ---------------------------------------------------------------------- through a real gRPC server
def _batches(client: Any, **kw: Any) -> tuple[list[dict[str, Any]], Any]:
    from trainer_client import StreamConfig

    kw = {"augment": False, "batch_size": 8, **kw}
    config = StreamConfig(dataset="train", patch_size=64, level=1, mode="grid", transport="grpc", **kw)
    stream = client.stream(config)
    batches = [b for _, b in zip(range(2), stream)]
    stream.close()
    return batches, stream


def test_macenko_session_is_deterministic_and_equals_normalising_read_regions(client: Any) -> None:
    reference = beer_lambert(H_REF, E_REF, 9, size=128)[0]
    first, stream = _batches(client, stain="macenko", stain_reference=reference)
    again, _ = _batches(client, stain="macenko", stain_reference=reference)
    plain, _ = _batches(client)
    target = StainConfig("macenko", stream.stain_target)
    assert stream.stain_target == fit_target("macenko", torch.from_numpy(reference)[None]).target
    for a, b, p in zip(first, again, plain):
        assert torch.equal(a["images"], b["images"])
        assert not torch.equal(a["images"], p["images"])
        raw = torch.stack([client.read_region("train", sid, int(x), int(y), 64, 64, level=1)
                           for sid, x, y in zip(a["slide_id"], a["x"], a["y"])])
        want = normalise_batch(raw, target).permute(0, 3, 1, 2)
        assert torch.equal(a["images"], want)


def test_dataset_fit_and_augmented_reinhard_sessions_repeat_exactly(client: Any) -> None:
    first, stream = _batches(client, stain="reinhard", stain_fit_samples=16, augment=True, seed=3)
    fitted = stream.stain_target
    assert len(fitted) == 6 and fitted[3] > 0
    again, stream2 = _batches(client, stain="reinhard", stain_fit_samples=16, augment=True, seed=3)
    assert stream2.stain_target == fitted
    for a, b in zip(first, again):
        assert torch.equal(a["images"], b["images"])
    given, _ = _batches(client, stain="reinhard", stain_target=fitted, augment=True, seed=3)
    for a, b in zip(first, given):
        assert torch.equal(a["images"], b["images"])


def test_bad_stain_requests_are_invalid_argument(client: Any) -> None:
    from trainer_client import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="6 values"):
        _batches(client, stain="reinhard", stain_target=(1.0, 2.0))
    with pytest.raises(InvalidRequestError, match="whole slides"):
        _batches(client, stain="reinhard", view="image", whole_slide=True, batch_size=1)
    with pytest.raises(InvalidRequestError, match="tissue pixels"):
        _batches(client, stain="macenko", stain_reference=np.full((32, 32, 3), 250, np.uint8))
