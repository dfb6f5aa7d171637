"""Issue 10: our clips equal the official EVL data pipeline's (eval tensors, train sampling, RandAugment ops).

The official math is written down here from the official repository's `video_dataset/` (dataset.py, transform.py,
rand_augment.py): it is restated, not imported, so these tests pin what the released checkpoints were fed.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from conftest import fixture_path
from evl_nb.transforms import (CLIP_MEAN, CLIP_STD, ClipRandAugment, RAND_INCREASING_OPS, dense_indices,
                               normalize_clip, rand_augment_op, resolve_convention)
from evl_nb.data import build_dataset
from evl_nb.video import check_video, read_frames_pyav

FIXTURES = ['bikes.mp4', 'carphone_pristine.mp4', 'balle-jbart.mp4', 'mmaction2_demo_armwrestling_k400.mp4',
            'mmaction2_test_cleaningpool.mp4', 'mmaction2_test_eyemakeup.avi', 'mmaction2_basketball.mp4']
S = 224


# ---------------------------------------------------------------- the official eval transform, restated
def official_eval_views(path, n, T, r, n_t, n_s, mmaction2=False):
    """Views of the official test mode, in its order (spatial-major): all frames -> float/255 -> CLIP normalise ->
    F.interpolate bilinear (no antialias) to short side S with long side `long*S//short` -> spatial crops (floor
    centre offset; or 0, margin//2, margin along the long side) -> temporal crops (pad with the last frame to the
    span, starts `slide//2` or `round(slide/(V-1)*i)`, stride r). `mmaction2=True`: its Resize rounds the long side
    (mmcv `int(long * S/short + 0.5)`), its third crop sits at `2 * (margin // 2)`, and indices past the end loop."""
    seg = (T - 1) * r + 1
    slide = max(n, seg) - seg
    starts = [slide // 2] if n_t == 1 else [round(slide / (n_t - 1) * i) for i in range(n_t)]
    per_t = [[min(st + k * r, n - 1) if not mmaction2 else (st + k * r) % n for k in range(T)] for st in starts]
    uniq = sorted(set(sum(per_t, [])))
    frames = dict(zip(uniq, read_frames_pyav(path, uniq)))
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)

    def clip(idx):
        x = torch.from_numpy(np.stack([frames[i] for i in idx])).float() / 255.
        x = ((x - mean) / std).permute(3, 0, 1, 2)                                 # C, T, H, W
        H, W = x.shape[-2:]
        size = (S, W * S // H) if H < W else (H * S // W, S)
        if mmaction2: size = (S, int(W * (S / H) + 0.5)) if H < W else (int(H * (S / W) + 0.5), S)
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False)

    clips, views = [clip(i) for i in per_t], []
    for s in range(n_s):
        for c in clips:
            H, W = c.shape[-2:]
            if n_s == 1:
                h0, w0 = (H - S) // 2, (W - S) // 2
                views.append(c[:, :, h0:h0 + S, w0:w0 + S])
            else:
                m = max(H, W) - S
                st = (0, m // 2, 2 * (m // 2) if mmaction2 else m)[s]
                views.append(c[:, :, st:st + S, :] if H > W else c[:, :, :, st:st + S])
    return views


VIEW_CASES = [('1x1', 8, 16), ('3x1', 8, 16), ('1x3', 16, 8)]


@pytest.fixture(scope='module')
def fixture_list(tmp_path_factory, checked_clips):
    vids = fixture_path('videos')
    d = tmp_path_factory.mktemp('conv')
    lst = d / 'list.txt'
    lst.write_text(''.join(f'{vids / n} {i}\n' for i, n in enumerate(FIXTURES)))
    return lst, checked_clips                         # each file checked once a session


def _max_diffs(lst, infos, views, T, r, **kw):
    n_t, n_s = (int(x) for x in views.split('x'))
    ds = build_dataset('list', 'test', ann_file=lst, num_frames=T, frame_interval=r, views=views, **kw)
    ds.infos = infos                                  # check each file once across the cases
    out = []
    for i, (path, _, _) in enumerate(ds.samples):
        ours = normalize_clip(ds[i]['video'])
        ours = ours.unsqueeze(0) if ours.ndim == 4 else ours                        # (V, 3, T, S, S), temporal-major
        ref = official_eval_views(path, ds.info(path).frames, T, r, n_t, n_s,
                                  mmaction2=ds.convention == 'mmaction2')          # spatial-major
        assert ours.shape[0] == len(ref) == n_t * n_s
        out.append(max(float((ours[t * n_s + s] - ref[s * n_t + t]).abs().max()) for t in range(n_t) for s in range(n_s)))
    return out


@pytest.mark.parametrize('views,T,r', VIEW_CASES)
def test_eval_clips_equal_official_transform(fixture_list, views, T, r):
    "Default (official) convention: every fixture clip, every view, within 0.02 in CLIP-normalised units."
    lst, infos = fixture_list
    diffs = _max_diffs(lst, infos, views, T, r)
    print(f'{views} {T}x{r}: max |ours - official| per clip', [round(d, 4) for d in diffs])
    assert max(diffs) <= 0.02, dict(zip(FIXTURES, diffs))


def test_mmaction2_convention_equals_mmaction2_eval(fixture_list):
    "convention='mmaction2': rounded long side, third crop at 2*(margin//2), looped indices (16x16 loops on the short clips)."
    lst, infos = fixture_list
    for views, T, r in (('1x3', 16, 8), ('1x1', 16, 16)):
        diffs = _max_diffs(lst, infos, views, T, r, convention='mmaction2')
        print(f'mmaction2 {views} {T}x{r}:', [round(d, 4) for d in diffs])
        assert max(diffs) <= 0.02


def test_legacy_convention_is_measurably_different(fixture_list):
    "The same comparison catches the old pipeline (antialiased resize, rounded centre offset)."
    lst, infos = fixture_list
    diffs = _max_diffs(lst, infos, '1x1', 8, 16, convention='legacy')
    print('legacy 1x1: max |ours - official| per clip', [round(d, 4) for d in diffs])
    assert max(diffs) > 0.1


# ---------------------------------------------------------------- the official train sampler, restated
def official_train_indices(n, T, r, randint):
    "The official `_random_sample_frame_idx` (dense): `randint(k)` draws uniformly from [0, k)."
    if r * (T - 1) + 1 >= n:                           # too short: i*r while in range, then repeat the last one
        out = []
        for i in range(T): out.append(i * r if i * r < n else out[-1])
        return out
    start = randint(n - r * (T - 1))
    return list(range(start, start + r * T, r))


class _Pick:
    "A stand-in for numpy's Generator whose `integers(high)` returns the lowest or the highest value, and records high."
    def __init__(self, which): self.which, self.highs = which, []
    def integers(self, high, size=None):
        self.highs.append(int(np.max(high)))
        v = np.zeros(size, dtype=np.int64) if self.which == 'min' else np.asarray(high, dtype=np.int64) - 1
        return np.broadcast_to(v, size).copy() if size is not None else v


@pytest.mark.parametrize('T,r', [(8, 16), (16, 8), (32, 4), (8, 8), (16, 16)])
def test_train_start_range_and_padding_equal_official(tmp_path, monkeypatch, T, r):
    "Totals 1..400: the dataset's train indices (default convention) at the lowest and the highest start, and padding."
    import evl_nb.transforms as D
    (tmp_path / 'x.mp4').touch(); (tmp_path / 'l.txt').write_text(f'{tmp_path / "x.mp4"} 0\n')
    ds = build_dataset('list', 'train', ann_file=tmp_path / 'l.txt', num_frames=T, frame_interval=r)
    assert ds.convention == 'official' and ds.out_of_bound == 'repeat_last'
    for n in range(1, 401):
        for which in ('min', 'max'):
            pick = _Pick(which)
            monkeypatch.setattr(D, '_as_rng', lambda rng, p=pick: p)
            ours = ds.indices(n)[0].tolist()
            want_high = []
            ref = official_train_indices(n, T, r, lambda k: (want_high.append(k), 0 if which == 'min' else k - 1)[1])
            assert ours == ref, (n, which, ours, ref)
            if want_high: assert pick.highs == want_high, (n, pick.highs, want_high)   # same range [0, n-(T-1)r-1]
    monkeypatch.undo()
    # the draw itself is uniform over that range
    starts = np.array([dense_indices(300, 8, 16, rng=np.random.default_rng(s), train_range='official')[0, 0]
                       for s in range(3000)])
    assert starts.min() == 0 and starts.max() == 300 - 7 * 16 - 1


def test_legacy_train_range_differs():
    lo = dense_indices(300, 8, 16, rng=_Pick('max'), **{'train_range': resolve_convention('legacy')['train_range']})
    assert lo[0, 0] == 300 - 8 * 16                  # mmaction2: [0, n - T*r]; official would give 187


# ---------------------------------------------------------------- RandAugment ops, the official semantics
GREY = (128, 128, 128)                              # official fill; resample bicubic for every geometric op
M = 7.0


def official_op(name, img, sign):
    "One op of the official rand_augment.py at magnitude 7 with the given sign, on a PIL image."
    W, H = img.size
    geo = dict(resample=Image.BICUBIC, fillcolor=GREY)
    a = np.asarray(img).astype(np.int32)
    if name == 'AutoContrast': return ImageOps.autocontrast(img)
    if name == 'Equalize': return ImageOps.equalize(img)
    if name == 'Invert': return Image.fromarray((255 - a).astype(np.uint8))
    if name == 'Rotate': return img.rotate(sign * 21.0, **geo)                                   # 30 * 7/10 degrees
    if name == 'ShearX': return img.transform(img.size, Image.AFFINE, (1, sign * 0.21, 0, 0, 1, 0), **geo)  # corner
    if name == 'ShearY': return img.transform(img.size, Image.AFFINE, (1, 0, 0, sign * 0.21, 1, 0), **geo)
    if name == 'TranslateXRel': return img.transform(img.size, Image.AFFINE, (1, 0, sign * 0.315 * W, 0, 1, 0), **geo)
    if name == 'TranslateYRel': return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * 0.315 * H), **geo)
    if name == 'PosterizeIncreasing': return Image.fromarray((a & 0b11000000).astype(np.uint8))    # keep 4 - int(2.8) = 2 bits
    if name == 'SolarizeIncreasing': return Image.fromarray(np.where(a < 77, a, 255 - a).astype(np.uint8))  # 256 - int(179.2)
    if name == 'SolarizeAdd': return Image.fromarray(np.where(a < 128, np.minimum(a + 77, 255), a).astype(np.uint8))
    f = 1.0 + sign * 0.63                                                                      # 1 +- 0.9 * 7/10
    return {'ColorIncreasing': ImageEnhance.Color, 'ContrastIncreasing': ImageEnhance.Contrast,
            'BrightnessIncreasing': ImageEnhance.Brightness, 'SharpnessIncreasing': ImageEnhance.Sharpness}[name](img).enhance(f)


@pytest.fixture(scope='module')
def real_clip():
    frames = read_frames_pyav(fixture_path('videos', 'mmaction2_demo_armwrestling_k400.mp4'), [0, 60, 200])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()             # (3, 3, 256, 340) uint8


def _reference(name, clip, sign):
    imgs = [official_op(name, Image.fromarray(f.permute(1, 2, 0).numpy()), sign) for f in clip]
    return torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2)


SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing', 'ContrastIncreasing',
          'BrightnessIncreasing', 'SharpnessIncreasing'}


@pytest.mark.parametrize('name', RAND_INCREASING_OPS)
def test_rand_augment_op_equals_official(real_clip, name):
    "Each op at magnitude 7, both signs, equals the official op on every frame (exactly), directly and via the module."
    signs = (1.0, -1.0) if name in SIGNED else (1.0,)
    refs = {s: _reference(name, real_clip, s) for s in signs}
    for s in signs:
        got = rand_augment_op(name, real_clip, M, s)
        assert got.dtype == torch.uint8 and torch.equal(got.as_subclass(torch.Tensor), refs[s]), (name, s)
    ra = ClipRandAugment(n=1, m=M, mstd=0.0, p=1.0, ops=(name,))                   # default style: official
    seen = set()
    for seed in range(6):
        out = ra(real_clip, generator=torch.Generator().manual_seed(seed)).as_subclass(torch.Tensor)
        match = [s for s in signs if torch.equal(out, refs[s])]
        assert match, (name, seed)
        seen.add(match[0])
    assert seen == set(signs)


def test_geometric_ops_fill_interpolation_centre(real_clip):
    "The three details, one by one: grey-128 fill, bicubic (not bilinear) resampling, shear about the top-left corner."
    rot = rand_augment_op('Rotate', real_clip, M, 1.0).as_subclass(torch.Tensor)
    assert rot[:, :, 0, 0].eq(128).all() and rot[:, :, -1, -1].eq(128).all()           # corners: fill 128
    legacy = rand_augment_op('Rotate', real_clip, M, 1.0, style='torchvision').as_subclass(torch.Tensor)
    assert not legacy[:, :, 0, 0].eq(128).all()                                         # CLIP-mean fill instead
    img = Image.fromarray(real_clip[0].permute(1, 2, 0).numpy())
    bilinear = np.asarray(img.transform(img.size, Image.AFFINE, (1, 0.21, 0, 0, 1, 0), resample=Image.BILINEAR,
                                        fillcolor=GREY))
    shx = rand_augment_op('ShearX', real_clip, M, 1.0).as_subclass(torch.Tensor)[0].permute(1, 2, 0).numpy()
    assert np.abs(shx.astype(int) - bilinear).max() > 0                                 # bicubic differs from bilinear
    # corner shear: the top row hardly moves (sub-pixel), the bottom row moves by 0.21*H ~ 54 px (filled at the right)
    top_in = real_clip[0, :, 0].float()
    assert (torch.from_numpy(shx[0]).permute(1, 0).float() - top_in).abs().mean() < 12
    assert (shx[-1, -40:] == 128).all() and not (shx[0, -40:] == 128).all()
    leg = rand_augment_op('ShearX', real_clip, M, 1.0, style='torchvision').as_subclass(torch.Tensor)[0].permute(1, 2, 0)
    d = (leg.float() - torch.from_numpy(shx).float()).abs().mean().item()
    print(f'ShearX m7: mean |torchvision-style - official| = {d:.1f} grey levels')
    assert d > 10


def test_train_crop_resize_equals_official(real_clip):
    "The train crop: the same box, resized without antialias, equals the official (normalise, crop, F.interpolate)."
    from torchvision.transforms import RandomResizedCrop
    from evl_nb.transforms import ClipResizedCrop
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for seed in range(5):
        torch.manual_seed(seed); ours = ClipResizedCrop(S, antialias=resolve_convention()['antialias'])(real_clip)
        torch.manual_seed(seed); i, j, h, w = RandomResizedCrop.get_params(real_clip, [0.08, 1.0], [3 / 4, 4 / 3])
        x = (real_clip.float() / 255. - mean) / std                                    # (T, 3, H, W)
        ref = F.interpolate(x[:, :, i:i + h, j:j + w], size=(S, S), mode='bilinear', align_corners=False)
        got = (ours.as_subclass(torch.Tensor).float() / 255. - mean) / std
        assert float((got - ref).abs().max()) <= 0.02, seed


def test_bad_switch_values_fail_at_construction(tmp_path):
    "A bad switch is an error naming the parameter when the dataset is built, never a skip of every clip."
    (tmp_path / 'x.mp4').touch(); (tmp_path / 'l.txt').write_text(f'{tmp_path / "x.mp4"} 0\n')
    for kw, msg in ((dict(out_of_bound='wrap'), "out_of_bound='wrap'"), (dict(crop_offset='ceil'), "crop_offset='ceil'"),
                    (dict(convention='timm'), "convention='timm'"), (dict(train_range='tsn'), "train_range='tsn'")):
        with pytest.raises(ValueError, match=msg): build_dataset('list', 'val', ann_file=tmp_path / 'l.txt', **kw)
