"""Augmentation for real images: the Inception-style random resized crop (vectorised, both
drawing modes, through both loaders) and torchvision.transforms v2 pipelines run per sample
under per-sample seeds (the vision lane)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.data.augment import (
    Compose,
    HorizontalFlip,
    RandomResizedCrop,
    build_augment,
    crop_resize,
    resized_crop_boxes,
)
from kdkit.data.loader import BatchLoader
from kdkit.data.stream import DatasetLoader
from kdkit.data.views import augment_key, hash_uniforms
from kdkit.errors import KdkitError

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _images(n=6, c=3, h=16, w=16, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _uniforms(n, d, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------ the resized crop


@pytest.mark.parametrize("size, expected", [(None, (16, 12)), (8, (8, 8)), ((10, 6), (10, 6))])
def test_resized_crop_output_shape(size, expected):
    x = _images(h=16, w=12)
    aug = RandomResizedCrop(size)
    assert aug.n_draws == 22
    assert aug(x, torch.Generator().manual_seed(0)).shape == (6, 3, *expected)
    assert aug.apply(x, _uniforms(6, aug.n_draws)).shape == (6, 3, *expected)
    assert aug.apply(x[:0], _uniforms(0, aug.n_draws)).shape == (0, 3, *expected)
    assert RandomResizedCrop(size, attempts=3).n_draws == 8


def test_full_box_on_a_square_image_is_the_identity():
    x = _images(h=20, w=20)
    aug = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(aug.apply(x, _uniforms(6, aug.n_draws)), x)
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(3)), x)


def test_a_box_of_the_output_size_is_an_exact_slice_and_an_upscale_is_smooth():
    x = _images(n=3, h=12, w=14)
    boxes = torch.tensor([[0, 0, 5, 7], [3, 6, 5, 7], [7, 7, 5, 7]])  # [top, left, h, w]
    out = crop_resize(x, boxes, (5, 7))
    for j, (t, left, h, w) in enumerate(boxes.tolist()):
        torch.testing.assert_close(out[j], x[j, :, t : t + h, left : left + w])
    # a box twice upscaled matches bilinear interpolation of the crop away from its edges
    big = crop_resize(x, boxes, (10, 14))
    for j, (t, left, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[j : j + 1, :, t : t + h, left : left + w], size=(10, 14),
                            mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(big[j, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1])


@pytest.mark.parametrize("height, width, scale, ratio", [
    (512, 512, (0.08, 1.0), (3 / 4, 4 / 3)),
    (300, 500, (0.2, 0.6), (0.5, 2.0)),
    (400, 400, (0.5, 1.0), (1.0, 1.0)),
])
def test_boxes_fall_in_the_scale_and_ratio_ranges(height, width, scale, ratio):
    attempts, n = 10, 20000
    boxes = resized_crop_boxes(_uniforms(n, 2 * attempts + 2, seed=1), height, width, scale,
                               ratio, attempts)
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all())
    assert bool((top + h <= height).all() and (left + w <= width).all())  # inside the image
    area = (h * w).double() / (height * width)
    aspect = w.double() / h.double()
    tol = 0.01  # the sides are rounded to whole pixels
    assert bool((area >= scale[0] * (1 - tol)).all() and (area <= scale[1] * (1 + tol)).all())
    assert bool((aspect >= ratio[0] * (1 - tol)).all() and (aspect <= ratio[1] * (1 + tol)).all())
    # the draws cover the ranges; on a square image, where a tall box fits as often as a wide
    # one, the aspect is log-uniform: symmetric in log around the middle of the range
    assert area.min() < scale[0] + 0.05 and area.max() > scale[1] - 0.05
    if ratio[0] < ratio[1]:
        assert aspect.min() < ratio[0] * 1.05 and aspect.max() > ratio[1] * 0.95
    if ratio[0] < ratio[1] and height == width:
        mid = (math.log(ratio[0]) + math.log(ratio[1])) / 2
        assert abs(float(aspect.log().median()) - mid) < 0.02
        quarter = (math.log(ratio[1]) - math.log(ratio[0])) / 4
        inner = ((aspect.log() - mid).abs() < quarter).double().mean()
        assert 0.45 < float(inner) < 0.55  # half the mass in the middle half of log(ratio)
    # the position is spread over the places where the box fits
    assert len(set(top.tolist())) > 50 and len(set(left.tolist())) > 50


def test_when_no_attempt_fits_the_box_is_a_centred_crop_of_the_nearest_aspect():
    u = _uniforms(50, 2 * 10 + 2)
    # area the whole image at aspect 2..3 never fits a square image: fall back to w/h = 2
    boxes = resized_crop_boxes(u, 40, 40, (1.0, 1.0), (2.0, 3.0), 10)
    assert boxes.tolist() == [[10, 0, 20, 40]] * 50
    boxes = resized_crop_boxes(u, 40, 40, (1.0, 1.0), (0.25, 0.5), 10)  # too tall: w/h = 0.5
    assert boxes.tolist() == [[0, 10, 40, 20]] * 50
    with pytest.raises(KdkitError, match=r"u must be \(N, 22\)"):
        resized_crop_boxes(u[:, :5], 40, 40)


def test_apply_is_a_function_of_u():
    x = _images(n=8)
    aug = RandomResizedCrop(12)
    u = _uniforms(8, aug.n_draws, seed=5)
    a = aug.apply(x, u)
    assert torch.equal(a, aug.apply(x, u.clone()))
    # a sample's crop depends on its own row of u only
    assert torch.equal(aug.apply(x[2:5], u[2:5]), a[2:5])
    b = aug.apply(x, _uniforms(8, aug.n_draws, seed=6))
    assert all(not torch.allclose(a[j], b[j]) for j in range(8))


def test_batch_mode_is_deterministic_under_the_generator_seed():
    x = _images(n=8)
    aug = RandomResizedCrop()
    a = aug(x, torch.Generator().manual_seed(11))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(11)))
    b = aug(x, torch.Generator().manual_seed(12))
    assert not torch.allclose(a, b)
    state = torch.get_rng_state()
    aug(x, torch.Generator().manual_seed(11))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used


def test_resized_crop_composes_with_the_flip():
    x = _images(n=5)
    aug = build_augment({"resized_crop": {"scale": [1, 1], "ratio": [1, 1]}, "hflip": 1.0})
    assert isinstance(aug, Compose) and aug.n_draws == 23
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(0)), x.flip(-1))
    aug = build_augment({"resized_crop": {"size": 10}, "hflip": True})
    crop, flip = aug.augments
    assert isinstance(crop, RandomResizedCrop) and isinstance(flip, HorizontalFlip)
    u = _uniforms(5, aug.n_draws)
    assert torch.equal(aug.apply(x, u), flip.apply(crop.apply(x, u[:, :22]), u[:, 22:]))
    assert aug.apply(x, u).shape == (5, 3, 10, 10)


def test_resized_crop_runs_on_the_device(device):
    x = _images(n=4)
    aug = RandomResizedCrop(8)
    u = _uniforms(4, aug.n_draws)
    out = aug.apply(x.to(device), u)
    assert out.device.type == device.type and out.shape == (4, 3, 8, 8)
    torch.testing.assert_close(out.cpu(), aug.apply(x, u), atol=1e-5, rtol=1e-5)


def test_the_crop_through_the_dataset_loader_and_view_mode(digits):
    from torch.utils.data import TensorDataset

    spec = {"resized_crop": {"scale": [0.3, 1.0]}, "hflip": True}
    aug = build_augment(spec, fill=digits.black)
    data = TensorDataset(digits.train.x, digits.train.y)
    first = list(DatasetLoader(data, 64, seed=2, augment=aug).epoch_batches(0))
    again = list(DatasetLoader(data, 64, seed=2, augment=build_augment(spec)).epoch_batches(0))
    for (x0, y0, i0), (x1, _, _) in zip(first, again, strict=True):
        assert x0.shape == (len(y0), *digits.train.x.shape[1:])
        assert torch.equal(x0, x1)
        assert not torch.equal(x0, digits.train.x[i0])  # really augmented
    # view mode: a view is a function of (sample, view), whatever the batch size
    views = []
    for bs in (32, 100):
        loader = BatchLoader(digits.train, bs, shuffle=True, seed=1, augment=aug, views=3)
        parts = list(loader.epoch_batches(0))
        x = torch.cat([p[0] for p in parts])
        index = torch.cat([p[2] for p in parts])
        views.append(x[index.argsort()])
    assert torch.equal(views[0], views[1])
    assert views[0].shape == digits.train.x.shape
    assert not torch.equal(views[0], digits.train.x)


@pytest.mark.parametrize("spec, message", [
    ({"resized_crop": 3}, "'resized_crop' is true or a mapping with keys scale, ratio, size"),
    ({"resized_crop": {"scal": [0.1, 1]}}, "unknown 'resized_crop' key.*'scal'.*valid keys: "
                                           "scale, ratio, size, attempts"),
    ({"resized_crop": {"scale": 0.5}}, r"'resized_crop.scale' must be \[min, max\]"),
    ({"resized_crop": {"scale": [0.5, 0.1]}}, "'resized_crop': scale must be .*0 < min <= max <= 1"),
    ({"resized_crop": {"scale": [0, 1]}}, "'resized_crop': scale must be"),
    ({"resized_crop": {"ratio": [2, 1]}}, "'resized_crop': ratio must be .*0 < min <= max"),
    ({"resized_crop": {"ratio": [1, "a"]}}, r"'resized_crop.ratio' must be \[min, max\]"),
    ({"resized_crop": {"size": [32]}}, r"'resized_crop.size' must be a whole number or \[height"),
    ({"resized_crop": {"size": 0}}, "'resized_crop': size must be >= 1"),
    ({"resized_crop": {"attempts": 0}}, "'resized_crop.attempts' must be a whole number >= 1"),
    ({"torchvision": "RandomHorizontalFlip"}, r"'torchvision' is a list of \[NAME, \{ARGS\}\]"),
    ({"torchvision": [[1, {}]]}, r"'torchvision' is a list of .*got the item"),
    ({"resize": 1}, "unknown augmentation key.*'resize'.*resized_crop, torchvision"),
])
def test_bad_specs_name_the_key_and_the_fix(spec, message):
    with pytest.raises(KdkitError, match=message):
        build_augment(spec)


def test_good_specs():
    aug = build_augment({"resized_crop": True})
    assert isinstance(aug, RandomResizedCrop)
    assert (aug.scale, aug.ratio, aug.size, aug.attempts) == ((0.08, 1.0), (0.75, 4 / 3), None, 10)
    aug = build_augment({"resized_crop": {"scale": [0.08, 1.0], "ratio": [0.75, 1.333],
                                          "size": 32}})
    assert isinstance(aug, RandomResizedCrop) and aug.size == (32, 32)
    assert build_augment({"resized_crop": False}) is None
    # different settings draw differently in view mode (the fingerprint names them)
    assert augment_key(RandomResizedCrop(8)) != augment_key(RandomResizedCrop(8, scale=(0.2, 1)))


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed here")
def test_torchvision_missing_is_one_clear_error():
    with pytest.raises(KdkitError, match="needs the torchvision package, which is not installed"
                                         r".*pip install torchvision \(make setup-vision"):
        build_augment({"torchvision": [["RandomHorizontalFlip", {}]]})


# ------------------------------------------------------------ torchvision v2 (vision lane)

TV_SPEC = {"torchvision": [["RandomResizedCrop", {"size": 12, "antialias": True}],
                           ["RandomHorizontalFlip", {}],
                           ["ColorJitter", {"brightness": 0.4}]]}


def _unit_images(n=6, h=16, w=16):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.vision
def test_torchvision_pipeline_is_a_function_of_u_and_leaves_the_global_rng():
    pytest.importorskip("torchvision")
    aug = build_augment(TV_SPEC)
    assert aug.n_draws == 1
    x = _unit_images()
    u = _uniforms(6, 1, seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = aug.apply(x, u)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert a.shape == (6, 3, 12, 12)
    assert torch.equal(a, aug.apply(x, u.clone()))
    assert torch.equal(aug.apply(x[1:4], u[1:4]), a[1:4])  # per sample, not per batch
    b = aug.apply(x, _uniforms(6, 1, seed=4))
    assert all(not torch.allclose(a[j], b[j]) for j in range(6))
    # two samples with the same image and different uniforms get different crops
    same = aug.apply(x[:1].expand(6, -1, -1, -1), u)
    assert len({tuple(s.flatten()[:20].tolist()) for s in same}) == 6
    # batch mode: the per-sample seeds come from the generator
    c = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(c, aug(x, torch.Generator().manual_seed(7)))
    assert not torch.allclose(c, aug(x, torch.Generator().manual_seed(8)))
    assert torch.equal(state, torch.get_rng_state())
    assert aug.apply(x[:0], u[:0]).shape[0] == 0


@pytest.mark.vision
def test_torchvision_pipeline_matches_torchvision_under_the_same_seed():
    pytest.importorskip("torchvision")
    from torchvision.transforms import v2

    aug = build_augment(TV_SPEC)
    x = _unit_images(n=3)
    u = _uniforms(3, 1, seed=9)
    pipe = v2.Compose([v2.RandomResizedCrop(12, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(brightness=0.4)])
    for j in range(3):
        torch.manual_seed(int(u[j, 0] * 2**53))
        torch.testing.assert_close(aug.apply(x[j : j + 1], u[j : j + 1])[0], pipe(x[j]))


@pytest.mark.vision
def test_torchvision_pipeline_on_the_device(device):
    pytest.importorskip("torchvision")
    aug = build_augment({"torchvision": [["RandomResizedCrop", {"size": 8}],
                                         ["RandomHorizontalFlip", {}]]})
    x = _unit_images(n=4).to(device)
    u = _uniforms(4, 1)
    state = torch.get_rng_state()
    out = aug.apply(x, u)
    assert out.device.type == device.type and out.shape == (4, 3, 8, 8)
    assert torch.equal(out, aug.apply(x, u))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.vision
def test_torchvision_pipeline_through_the_loaders(digits):
    pytest.importorskip("torchvision")
    from torch.utils.data import TensorDataset

    spec = {"torchvision": [["RandomResizedCrop", {"size": 8, "scale": [0.5, 1.0]}],
                            ["RandomHorizontalFlip", {}]]}
    aug = build_augment(spec)
    data = TensorDataset(digits.train.x, digits.train.y)
    torch.manual_seed(0)
    first = list(DatasetLoader(data, 64, seed=2, augment=aug).epoch_batches(0))
    torch.manual_seed(1)  # the global seed plays no part
    again = list(DatasetLoader(data, 64, seed=2, augment=aug, num_workers=2).epoch_batches(0))
    for (x0, _, i0), (x1, _, i1) in zip(first, again, strict=True):
        assert torch.equal(x0, x1) and torch.equal(i0, i1)
    views = []
    for bs in (32, 100):
        parts = list(BatchLoader(digits.train, bs, shuffle=True, seed=1, augment=aug,
                                 views=2).epoch_batches(0))
        index = torch.cat([p[2] for p in parts])
        views.append(torch.cat([p[0] for p in parts])[index.argsort()])
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], digits.train.x)


@pytest.mark.vision
def test_torchvision_bad_names_and_arguments():
    pytest.importorskip("torchvision")
    with pytest.raises(KdkitError, match="torchvision.transforms.v2 has no transform "
                                         "'RandomResizeCrop'.*pytorch.org/vision"):
        build_augment({"torchvision": [["RandomResizeCrop", {"size": 8}]]})
    with pytest.raises(KdkitError, match="has no transform 'functional'"):
        build_augment({"torchvision": [["functional", {}]]})
    with pytest.raises(KdkitError, match=r"RandomResizedCrop\(\*\*\{'sise': 8\}\) failed"):
        build_augment({"torchvision": [["RandomResizedCrop", {"sise": 8}]]})
    aug = build_augment({"torchvision": [["RandomCrop", {"size": 8, "pad_if_needed": True}],
                                         "RandomHorizontalFlip"]})
    assert "RandomCrop" in repr(aug) and "torchvision=" in repr(aug)  # the cache fingerprint
    assert augment_key(aug) != augment_key(build_augment({"torchvision": ["RandomHorizontalFlip"]}))
    # images of different sizes out of the pipeline: one clear error
    ragged = build_augment({"torchvision": [["RandomResizedCrop", {"size": 8}],
                                            ["RandomZoomOut", {"side_range": [1.0, 3.0]}]]})
    with pytest.raises(KdkitError, match="different sizes.*fixed size"):
        ragged.apply(_unit_images(n=8), hash_uniforms(1, torch.arange(8), torch.zeros(8,
                                                       dtype=torch.long), 1))
