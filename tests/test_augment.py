"""The colour augmentation batched on the device (common.draw_color_params / apply_color_params) against
torchvision's per-image ColorJitter + RandomGrayscale: the same ops for fixed parameters, the same distribution."""
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F

from common import apply_color_params, draw_color_params

TV_OPS = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
N_SAMPLES = 4000
# Two-sided z threshold, ~7e-6 per comparison: a correct implementation fails one of the ~300
# comparisons below with probability ~0.2% per seed (the tests are seeded, so deterministic).
Z = 4.5


def _images(n, size=(13, 17), seed=0):
    """Random float images with the awkward pixels: exact 0 and 1, grey, and near-grey."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, *size, generator=g)
    x[:, :, 0] = x[:, :, 0].round()                              # channels at exactly 0 or 1
    x[:, :, 1] = x[:, :1, 1]                                     # grey pixels
    x[:, :, 2] = x[:, :1, 2] + 1e-4 * x[:, :, 2]                 # near-grey pixels
    return x


def _tv_reference(img, p):
    """torchvision's ops on one image, in p's order; a zero hue factor skips hue, as in ColorJitter."""
    for op in p[4:8].long().tolist():
        if not (op == 3 and p[3] == 0):
            img = TV_OPS[op](img, float(p[op]))
    return F.rgb_to_grayscale(img, num_output_channels=3) if p[8] else img


def _params(factors, order, gray=0.0):
    return torch.tensor([*factors, *order, gray], dtype=torch.float32)


def _fixed_params():
    rng = np.random.default_rng(1)
    def rand_factors():  # wider than the defaults, to reach factor 0 region and hue +-0.5
        return [*rng.uniform(0, 2, 3), rng.uniform(-0.5, 0.5)]
    cases = [_params(rand_factors(), perm) for perm in itertools.permutations(range(4))]
    for op in range(4):  # each op alone, at a random position
        factors = [1.0, 1.0, 1.0, 0.0]
        factors[op] = rand_factors()[op]
        cases.append(_params(factors, rng.permutation(4)))
    cases += [_params([1, 1, 1, 0], range(4)),                           # identity
              _params([1, 1, 1, 0], range(4), gray=1),                   # grayscale only
              _params(rand_factors(), rng.permutation(4), gray=1),       # jitter then grayscale
              _params([0, 0, 0, 0.5], [3, 2, 1, 0]), _params([2, 2, 2, -0.5], [0, 3, 1, 2])]
    return torch.stack(cases)


def test_matches_torchvision_for_fixed_params():
    params = _fixed_params()                                             # (B, 9)
    x = _images(len(params))
    x_before = x.clone()
    out = apply_color_params(x, params)
    ref = torch.stack([_tv_reference(img, p) for img, p in zip(x, params)])
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(x, x_before), "input must not be modified"
    assert (out - ref).abs().max() < 1e-5
    # Unjittered images take no HSV round trip, so they stay bit-identical, as in torchvision.
    unjittered = (params[:, 0:4] == torch.tensor([1.0, 1, 1, 0])).all(dim=1)
    assert torch.equal(out[unjittered], ref[unjittered])


def test_float32_inside_autocast():
    params, x = _fixed_params(), _images(len(_fixed_params()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_color_params(x, params)
    assert out.dtype == torch.float32 and torch.equal(out, apply_color_params(x, params))


def test_draw_ranges_and_edge_cases():
    rng = np.random.default_rng(0)
    p = torch.stack([draw_color_params(rng, (0.4, 1.5, 0.0, 0.5)) for _ in range(2000)])
    assert p.dtype == torch.float32 and p.shape == (2000, 9)
    jittered = p[:, 3] != 0                                              # hue is 0 only unjittered
    b, c, s, h = p[jittered, 0:4].T
    assert 0.6 <= b.min() < 0.62 and 1.38 < b.max() <= 1.4              # [1 - 0.4, 1 + 0.4]
    assert 0 <= c.min() < 0.02 and 2.48 < c.max() <= 2.5                # clipped at 0 like torchvision
    assert (s == 1).all() and 0.48 < h.abs().max() <= 0.5               # saturation 0: identity
    assert (p[:, 4:8].sort(dim=1).values == torch.arange(4.0)).all()    # always a permutation
    assert len({tuple(o) for o in p[jittered, 4:8].tolist()}) == 24
    assert (p[~jittered, 0:4] == torch.tensor([1.0, 1, 1, 0])).all()
    x = _images(64)
    none = torch.stack([draw_color_params(rng, p_jitter=0, p_gray=0) for _ in range(64)])
    assert torch.equal(apply_color_params(x, none), x)
    every = torch.stack([draw_color_params(rng, p_jitter=1, p_gray=1) for _ in range(64)])
    out = apply_color_params(x, every)
    assert (out == out[:, :1]).all() and (every[:, 3] != 0).all()


def _distribution_image():
    """Rows of uniform colours (3, 6, 8): saturated, near-white, dark and grey-ish, so that hue
    shifts move channel means and the op order changes which channels end up clipped."""
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.95, 0.9, 0.3], [0.2, 0.4, 0.8],
                            [0.1, 0.3, 0.1], [0.7, 0.7, 0.75], [0.5, 0.2, 0.6]])
    return colours.T[:, :, None].expand(3, 6, 8).contiguous()


def _features(out):
    """Per output (N, 36): the mean of each channel in each colour row, and whether it is clipped.

    Clipping is what makes the op order matter (ops commute up to clipping and hue's change of
    luma), so the clipped indicators are what catch a fixed or wrong order.
    """
    clipped = (out < 1e-6) | (out > 1 - 1e-6)
    return torch.cat([out.mean(3).flatten(1), clipped.double().mean(3).flatten(1)], 1).double()


def _ours(img, n, **kw):
    rng = np.random.default_rng(0)
    params = torch.stack([draw_color_params(rng, **kw) for _ in range(n)])
    return apply_color_params(img.expand(n, -1, -1, -1), params)


def _torchvision(img, n, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2):
    torch.manual_seed(0)
    tf = v2.Compose([v2.RandomApply([v2.ColorJitter(*jitter)], p=p_jitter), v2.RandomGrayscale(p=p_gray)])
    return torch.stack([tf(img) for _ in range(n)])


def _assert_share(hits, p, what):
    """The share of ``hits`` (N,) bool is p within Z standard errors of a binomial."""
    share = hits.double().mean().item()
    assert abs(share - p) <= Z * (p * (1 - p) / len(hits)) ** 0.5, f"{what}: {share} vs {p}"


def assert_same_distribution(img, a, b, p_jitter, p_gray):
    """Mean and spread (1st, 2nd moment) of every feature agree between ``a`` and ``b`` by a
    two-sample z test; in both, the share of grey outputs is p_gray and of outputs left
    untouched is (1 - p_jitter) * (1 - p_gray)."""
    fa, fb = _features(a), _features(b)
    for m in (1, 2):
        se = ((fa ** m).var(0) / len(fa) + (fb ** m).var(0) / len(fb)).sqrt().clamp_min(1e-12)
        z = ((fa ** m).mean(0) - (fb ** m).mean(0)) / se
        assert z.abs().max() < Z, f"moment {m}: max |z| = {z.abs().max():.1f}"
    for out in (a, b):
        _assert_share((out == out[:, :1]).flatten(1).all(1), p_gray, "grey share")
        _assert_share((out == img).flatten(1).all(1), (1 - p_jitter) * (1 - p_gray), "untouched share")


@pytest.mark.parametrize("kw", [
    {},                                                                  # MaskContrast defaults
    {"jitter": (0.4, 0.4, 0.4, 0.5)},                                    # the demo's hue 0.5
    {"jitter": (1.5, 0.0, 0.8, 0.0), "p_jitter": 1.0, "p_gray": 0.0},    # brightness to 0, skips
])
def test_distribution_matches_torchvision(kw):
    img = _distribution_image()
    assert_same_distribution(img, _ours(img, N_SAMPLES, **kw), _torchvision(img, N_SAMPLES, **kw),
                             kw.get("p_jitter", 0.8), kw.get("p_gray", 0.2))
