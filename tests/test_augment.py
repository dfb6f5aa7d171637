"""Augmentation on the device: each tensor op against the PIL reference on real frames, the parameters drawn in the
worker against what the PIL path draws (10,000 clips, seed by seed), worker and device items against each other,
and posterize at magnitude 10 defined on both paths."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from evl_nb.augment import (ClipAug, GEOMETRIC_OPS, apply_clip_aug, batch_clips, point_lut, tensor_op)
from evl_nb.transforms import RAND_INCREASING_OPS, ClipRandAugment, FlipPolicy, rand_augment_op, resize_short
from evl_nb.data import VideoClipDataset, build_dataset, collate_clips
from evl_nb.video import read_frames_pyav
from conftest import fixture_path

RA = 'rand-m7-n4-mstd0.5-inc1'


@pytest.fixture(scope='module')
def frames():
    "Two frames of each of two fixture videos at a short side of 96: (T, 3, H, W) uint8 clips."
    vids = fixture_path('videos')
    out = []
    for name in ('bikes.mp4', 'mmaction2_basketball.mp4'):
        f = torch.from_numpy(np.ascontiguousarray(read_frames_pyav(vids / name, [0, 20]))).permute(0, 3, 1, 2)
        out.append(resize_short(f.contiguous(), 96).as_subclass(torch.Tensor).contiguous())
    return out


def _diff(a, b):
    d = (a.int() - b.as_subclass(torch.Tensor).int()).abs().float()
    return d.mean().item(), d.max().item()


@pytest.mark.parametrize('name', RAND_INCREASING_OPS)
def test_tensor_op_matches_pil(frames, name):
    """Magnitudes 0, 5 and 10, both signs: mean difference at most 2 levels; every op that is not geometric
    exactly, shears and translations within one level."""
    worst = 0.0
    for clip in frames:
        for m in (0, 5, 10):
            for s in (1.0, -1.0):
                mean, mx = _diff(tensor_op(name, clip, m, s), rand_augment_op(name, clip, m, s))
                worst = max(worst, mean)
                if name not in GEOMETRIC_OPS: assert mx == 0, (name, m, s, mx)
                elif name != 'Rotate': assert mx <= 1, (name, m, s, mx)     # 4 taps with PIL's weights
    assert worst <= 2.0, (name, worst)


def test_posterize_at_magnitude_10_is_black_on_both_paths(frames):
    clip = frames[0]
    assert rand_augment_op('PosterizeIncreasing', clip, 10).as_subclass(torch.Tensor).max() == 0
    assert tensor_op('PosterizeIncreasing', clip, 10).max() == 0
    assert point_lut('PosterizeIncreasing', 10).max() == 0
    ra = ClipRandAugment.from_string('rand-m10-n2-mstd0-p1.0-inc1')
    ra.ops = ('PosterizeIncreasing',)
    assert ra(clip).as_subclass(torch.Tensor).max() == 0                     # the PIL path no longer crashes


def _frozen_pil_draws(ra, flip, H, W, label):
    """The draws of the PIL path as they were before the device path existed (ClipRandAugment.forward's loop, then
    ClipResizedCrop's RandomResizedCrop.get_params on the clip, then FlipPolicy), kept here as the reference."""
    signed = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing',
              'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'}
    todo = []
    for _ in range(ra.n):
        name = ra.ops[int(torch.randint(len(ra.ops), ()))]
        if torch.rand(()) >= ra.p: continue
        m = ra.m if ra.mstd <= 0 else float(torch.normal(ra.m, ra.mstd, ()))
        s = (1.0 if torch.rand(()) < 0.5 else -1.0) if name in signed else 1.0
        todo.append((name, min(10.0, max(0.0, m)), s))
    box = tuple(RandomResizedCrop.get_params(torch.zeros(1, H, W), [0.08, 1.0], [3 / 4, 4 / 3]))
    flipped = False
    if label not in flip.never and float(torch.rand(())) < flip.p:
        flipped, label = True, flip.pairs.get(label, label)
    return todo, box, flipped, label


def test_10000_clips_draw_the_same_parameters_as_the_pil_path():
    flip = FlipPolicy('swap', {0: 1, 1: 0}, {2})
    ds = VideoClipDataset.from_settings([], ['left', 'right', 'other', 'x'], train=True, rand_augment=RA, flip=flip,
                          input_size=32, augment_on='device')
    sizes = [(240, 320), (320, 568), (256, 256), (480, 272), (100, 1000)]
    for seed in range(10_000):
        H, W = sizes[seed % len(sizes)]
        label = seed % 4
        torch.manual_seed(seed)
        aug, lab = ds.draw_aug(H, W, label)
        after = torch.rand(())
        torch.manual_seed(seed)
        ops, box, flipped, ref_label = _frozen_pil_draws(ds.rand_augment, flip, H, W, label)
        assert (aug.ops, aug.box, aug.flip, lab) == (ops, box, flipped, ref_label), seed
        assert torch.equal(after, torch.rand(())), seed                     # and nothing more was drawn


def _items(ds, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(ds[0])
    return out


@pytest.mark.parametrize('rand_augment', [None, RA])
def test_worker_and_device_items_agree(rand_augment, tmp_path):
    "The same seeds give the same clips: bit for bit without RandAugment; with it, exact unless a geometric op ran."
    vids = fixture_path('videos')
    (tmp_path / 'list.txt').write_text(f'{vids / "bikes.mp4"} 0\n')
    kw = dict(data_root=None, ann_file=tmp_path / 'list.txt', num_frames=4, input_size=48, train=True,
              rand_augment=rand_augment, decode='pyav')
    w = build_dataset('list', 'train', augment_on='worker', **kw)
    d = build_dataset('list', 'train', augment_on='device', **kw)
    seeds = range(12)
    wi, di = _items(w, seeds), _items(d, seeds)
    got = batch_clips(collate_clips(di))
    want = collate_clips(wi)['video']
    assert got.shape == want.shape and got.dtype == torch.uint8
    for k, it in enumerate(di):
        geometric = any(op[0] in GEOMETRIC_OPS for op in it['aug'].ops)
        mean, _ = _diff(got[k], want[k])
        if geometric: assert mean < 2.0, (k, it['aug'])
        else: assert mean == 0, (k, it['aug'])
    if rand_augment is None: assert torch.equal(got, want)


def test_device_augment_on_another_frame_size_in_one_batch(frames):
    a, b = frames
    augs = [ClipAug([('Rotate', 5.0, 1.0)], (0, 0, 60, 60), False, 32), ClipAug([], (10, 20, 50, 70), True, 32)]
    out = batch_clips({'frames': [a, b], 'aug': augs})
    assert out.shape == (2, 3, 2, 32, 32)
    assert torch.equal(out[1], apply_clip_aug(b, augs[1]))


def test_augment_on_is_checked():
    with pytest.raises(ValueError, match='augment_on'):
        VideoClipDataset.from_settings([], ['a'], augment_on='gpu')


def test_torchvision_style_randaugment_stays_in_the_worker():
    "The mmaction2/legacy conventions' torchvision-style ops are not the device's: those datasets augment in the worker."
    ds = VideoClipDataset.from_settings([], ['a'], rand_augment=RA, convention='mmaction2', augment_on='device')
    assert ds.augment_on == 'worker'
    assert VideoClipDataset.from_settings([], ['a'], rand_augment=RA, augment_on='device').augment_on == 'device'
