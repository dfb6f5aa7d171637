"""The synthetic dataset: real mp4/webm files, official-format annotations, temporal-order-only classes, seedable, fast."""
import csv, json, time

import numpy as np
import pytest

from evl_nb.annotations import read_k400_csv, read_ssv2_json, lr_flip_pairs
from evl_nb.data import build_dataset
from evl_nb.synthetic import (make_synthetic_dataset, render_clip, render_clip_tracked, object_masks, load_object_tracks,
                              object_track_for, SYNTHETIC_CLASSES, SYNTHETIC_FLIP_PAIRS)
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


# ---------------------------------------------------------------- the object's track (ground truth for attention)

@pytest.mark.parametrize('label', [0, 3, 5, 7])
def test_track_masks_are_where_the_pixels_change(label):
    "Background and texture are static, so two frames differ exactly where the object is in either of them."
    frames, desc, track = render_clip_tracked(label, 10, 48, 64, rng=11)
    assert np.array_equal(frames, render_clip(label, 10, 48, 64, rng=11)[0])          # recording changes no pixel
    masks = object_masks(track)
    assert masks.shape == (10, 48, 64) and masks.dtype == bool and track['shape'] in desc
    for i, j in ((0, 9), (2, 6)):
        changed = (frames[i] != frames[j]).any(-1)
        assert not (changed & ~(masks[i] | masks[j])).any()                             # nothing changes off the object
        assert changed[masks[i] ^ masks[j]].mean() > 0.95                               # where it moved, pixels changed
    for m, box in zip(masks, track['box']):
        ys, xs = np.nonzero(m)
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_track_of_a_fading_object_is_empty_while_invisible():
    for seed in range(20):                                                              # 'appearing', hidden >= 2 frames
        frames, _, track = render_clip_tracked(8, 16, 48, 64, rng=seed)
        vis = np.array(track['visibility'])
        if (vis == 0).sum() >= 2: break
    assert vis[0] == 0 and vis[-1] == 1 and track['box'][0] is None and track['box'][-1] is not None
    masks = object_masks(track, [0, 15])
    assert not masks[0].any() and masks[1].any()
    hidden = np.nonzero(vis == 0)[0]
    assert len(hidden) >= 2 and all(np.array_equal(frames[hidden[0]], frames[i]) for i in hidden)   # nothing drawn
    with pytest.raises(IndexError, match='16 frames'): object_masks(track, [16])


def test_dataset_records_every_clips_track_and_backfills_old_datasets(tmp_path):
    kw = dict(num_classes=4, train_per_class=2, val_per_class=2, num_frames=(8, 12), size=48)
    syn = make_synthetic_dataset(tmp_path / 's', **kw)
    assert syn.objects.exists()
    tracks = load_object_tracks(syn.root)
    assert len(tracks) == 2 * 16 and all((syn.root / k).exists() for k in tracks)
    for path, label, _ in read_k400_csv(syn.val_csv, syn.root, classes=syn.classes).samples:
        t = object_track_for(path)
        assert t['label'] == label and t['split'] == 'val' and t['frames'] == check_video(path).frames
        assert object_track_for(syn.root / t['ssv2']) == t                              # the webm of the same clip
        # the recorded object is where the decoded video shows it (lossy: compare against the frame's own background)
        f = read_frames_pyav(path, [0, t['frames'] - 1]).astype(int)
        m = object_masks(t, [0, t['frames'] - 1])
        diff = np.abs(f[0] - f[1]).sum(-1)
        assert diff[m[0] ^ m[1]].mean() > 3 * diff[~(m[0] | m[1])].mean() or not (m[0] ^ m[1]).any()
    # a dataset written before tracks were recorded gets them on the next call, without touching its videos
    before = json.loads(syn.objects.read_text())
    mp4 = sorted(syn.root.rglob('*.mp4'))[0]; stamp = mp4.stat().st_mtime_ns
    meta = json.loads((syn.root / 'synthetic.json').read_text()); meta.pop('objects')
    (syn.root / 'synthetic.json').write_text(json.dumps(meta)); syn.objects.unlink()
    again = make_synthetic_dataset(tmp_path / 's', **kw)
    assert json.loads(again.objects.read_text()) == before and mp4.stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match='not inside a synthetic dataset'): object_track_for(tmp_path / 'x.mp4')
