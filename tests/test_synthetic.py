"""The synthetic dataset: real mp4/webm files, official-format annotations, temporal-order-only classes, seedable, fast."""
import csv, json, time

import numpy as np
import pytest

from evl_nb.data import read_k400_csv, read_ssv2_json, build_dataset, lr_flip_pairs
from evl_nb.synthetic import make_synthetic_dataset, render_clip, SYNTHETIC_CLASSES, SYNTHETIC_FLIP_PAIRS
from evl_nb.video import check_video, read_frames_pyav


def test_generates_a_few_hundred_clips_fast(tmp_path):
    t0 = time.time()
    syn = make_synthetic_dataset(tmp_path / 's', num_classes=10, train_per_class=20, val_per_class=5, num_frames=(16, 32), size=128)
    dt = time.time() - t0
    assert dt < 45, f'{dt:.1f}s for 250 clips (mp4 + webm)'
    tr = read_k400_csv(syn.train_csv, syn.root, classes=syn.classes)
    va = read_k400_csv(syn.val_csv, syn.root, classes=syn.classes)
    assert (len(tr), len(va), len(tr.classes)) == (200, 50, 10) and not tr.missing and not va.missing
    s2 = read_ssv2_json(syn.ssv2_train, syn.ssv2_labels, syn.ssv2_videos)
    assert len(s2) == 200 and s2.classes == tr.classes == syn.class_names
    assert [l for _, l, _ in s2.samples] == [l for _, l, _ in tr.samples]
    with open(syn.train_csv) as f: assert next(csv.reader(f)) == ['label', 'youtube_id', 'time_start', 'time_end', 'split', 'is_cc']
    with open(syn.val_csv) as f: assert next(csv.reader(f)) == ['label', 'youtube_id', 'time_start', 'time_end', 'split']
    item = json.loads(syn.ssv2_train.read_text())[0]
    assert set(item) == {'id', 'label', 'template', 'placeholders'} and '[' in item['template']
    # real files in the declared codecs, with frame counts in range
    mp4, webm = check_video(tr.samples[0][0]), check_video(s2.samples[0][0])
    assert (mp4.codec, webm.codec) == ('h264', 'vp9') and 16 <= mp4.frames <= 32 and mp4.height == 128
    assert mp4.frames == webm.frames
    # a second call with the same arguments returns at once
    t0 = time.time(); again = make_synthetic_dataset(tmp_path / 's', num_classes=10, train_per_class=20, val_per_class=5,
                                                     num_frames=(16, 32), size=128)
    assert time.time() - t0 < 1 and again == syn
    with pytest.raises(FileExistsError): make_synthetic_dataset(tmp_path / 's', num_classes=4)


def test_seeded_and_different_seeds_differ(tmp_path):
    kw = dict(num_classes=2, train_per_class=2, val_per_class=1, num_frames=16, size=48, ssv2=False)
    a = make_synthetic_dataset(tmp_path / 'a', seed=3, **kw); b = make_synthetic_dataset(tmp_path / 'b', seed=3, **kw)
    c = make_synthetic_dataset(tmp_path / 'c', seed=4, **kw)
    assert a.train_csv.read_text() == b.train_csv.read_text() != c.train_csv.read_text()
    pa, pb = read_k400_csv(a.train_csv, a.root).samples[0][0], read_k400_csv(b.train_csv, b.root).samples[0][0]
    fa, fb = read_frames_pyav(pa, range(16)).astype(int), read_frames_pyav(pb, range(16)).astype(int)
    assert np.abs(fa - fb).mean() < 1.0        # same content; the lossy encoder need not be bit-identical


@pytest.mark.parametrize('k', range(0, len(SYNTHETIC_CLASSES), 2))
def test_class_pairs_are_time_reversals(k):
    "Only temporal order separates a pair: with one seed, the partner class is the same clip played backwards."
    a, _ = render_clip(k, 12, 48, 64, rng=7); b, _ = render_clip(k + 1, 12, 48, 64, rng=7)
    assert np.array_equal(a[::-1], b) and not np.array_equal(a, b)


def test_random_appearance():
    clips = [render_clip(0, 4, 48, 64, rng=s)[0] for s in range(6)]
    bgs = {tuple(c[0, 0, 0] // 16) for c in clips}
    assert len(bgs) >= 4


def test_flip_pairs_declared_and_consistent_with_names(tmp_path):
    syn = make_synthetic_dataset(tmp_path / 's', num_classes=6, train_per_class=1, val_per_class=0, num_frames=8, size=32)
    assert syn.flip_pairs == SYNTHETIC_FLIP_PAIRS
    names = syn.class_names
    pairs, never = lr_flip_pairs(names)                 # SSv2's name rule finds the same pairs
    assert {names[i]: names[j] for i, j in pairs.items()} == SYNTHETIC_FLIP_PAIRS and not never
    ds = build_dataset('synthetic', 'train', data_root=syn.root, flip=True, num_frames=4, input_size=32)
    assert ds.flip.mode == 'swap' and ds.flip.pairs == pairs
    assert build_dataset('synthetic', 'train', data_root=syn.root).flip.mode == 'off'
    assert build_dataset('ssv2', 'train', data_root=syn.ssv2_videos, ann_file=syn.ssv2_train, flip=True).flip.pairs == pairs
