"""Annotations, mmaction2 sampling tables, transforms, flip policy, and loading through broken files with workers."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_nb.annotations import (AnnotationError, read_k400_csv, read_ssv2_json, read_list_file,
                                read_class_list, k400_name, lr_flip_pairs)
from evl_nb.transforms import (dense_indices, uniform_indices, parse_views, ClipRandAugment, FlipPolicy,
                               three_crop, center_crop, resize_short, normalize_clip, CLIP_MEAN, CLIP_STD)
from evl_nb.data import VideoClipDataset, build_dataset, build_loader
from evl_nb.synthetic import make_synthetic_dataset, render_clip, write_video
from test_video import make_broken_files


# ---------------------------------------------------------------- sampling
# mmaction2 1.x SampleFrames(clip_len, frame_interval, num_clips, test_mode=True), out_of_bound_opt='loop'
DENSE_TEST_TABLE = [
    # (clip_len, frame_interval, num_clips, total_frames, expected indices per clip)
    (8, 16, 1, 300, [[93, 109, 125, 141, 157, 173, 189, 205]]),
    (8, 16, 1, 113, [[0, 16, 32, 48, 64, 80, 96, 112]]),
    (8, 16, 1, 50, [[0, 16, 32, 48, 14, 30, 46, 12]]),                 # shorter than the span: loops
    (8, 16, 3, 200, [[0, 16, 32, 48, 64, 80, 96, 112], [44, 60, 76, 92, 108, 124, 140, 156],
                     [87, 103, 119, 135, 151, 167, 183, 199]]),          # 43.5 -> 44 (half to even)
    (8, 16, 3, 198, [[0, 16, 32, 48, 64, 80, 96, 112], [42, 58, 74, 90, 106, 122, 138, 154],
                     [85, 101, 117, 133, 149, 165, 181, 197]]),          # 42.5 -> 42 (half to even)
    (16, 4, 1, 64, [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61]]),
    (4, 1, 2, 3, [[0, 1, 2, 0], [0, 1, 2, 0]]),
    (8, 16, 1, 1, [[0] * 8]),
    (32, 2, 1, 20, [[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                     0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 0, 2]]),
]
DENSE_10_CLIP_STARTS = [0, 5, 10, 14, 19, 24, 29, 33, 38, 43]   # 8x8x10 on 100 frames: round(k * 43/9)


@pytest.mark.parametrize('clip_len,interval,num_clips,n,expected', DENSE_TEST_TABLE)
def test_dense_test_mode_matches_mmaction2_table(clip_len, interval, num_clips, n, expected):
    got = dense_indices(n, clip_len, interval, num_clips, test_mode=True, out_of_bound='loop')
    assert got.tolist() == expected


def test_dense_ten_views_and_out_of_bound_options():
    got = dense_indices(100, 8, 8, 10, test_mode=True)
    assert got[:, 0].tolist() == DENSE_10_CLIP_STARTS and got[3].tolist() == [14 + 8 * k for k in range(8)]
    # mmaction2 'repeat_last' repeats the clip's last in-range index; 'clamp' (the default) uses the last frame
    assert dense_indices(50, 8, 16, test_mode=True, out_of_bound='repeat_last').tolist() == [[0, 16, 32, 48, 48, 48, 48, 48]]
    assert dense_indices(50, 8, 16, test_mode=True).tolist() == [[0, 16, 32, 48, 49, 49, 49, 49]]
    assert dense_indices(20, 32, 2, test_mode=True, out_of_bound='repeat_last').tolist() == [list(range(0, 20, 2)) + [18] * 22]
    with pytest.raises(ValueError, match='out_of_bound'): dense_indices(50, 8, 16, out_of_bound='wrap')
    with pytest.raises(ValueError, match='num_frames'): dense_indices(0, 8, 16)


# mmaction2 SampleFrames(clip_len=1, frame_interval=1, num_clips=T, test_mode=True) of the TSN/TSM releases:
# int(i * n/T + n/(2T)), the segment centres
UNIFORM_TEST_TABLE = [
    (80, 8, [5, 15, 25, 35, 45, 55, 65, 75]),
    (100, 8, [6, 18, 31, 43, 56, 68, 81, 93]),
    (30, 8, [1, 5, 9, 13, 16, 20, 24, 28]),
    (8, 8, [0, 1, 2, 3, 4, 5, 6, 7]),
    (5, 8, [0, 0, 1, 2, 2, 3, 4, 4]),                              # shorter than the number of segments
    (1, 8, [0] * 8),
    (50, 16, [1, 4, 7, 10, 14, 17, 20, 23, 26, 29, 32, 35, 39, 42, 45, 48]),
]


@pytest.mark.parametrize('n,T,expected', UNIFORM_TEST_TABLE)
def test_uniform_test_mode_is_segment_centres(n, T, expected):
    assert uniform_indices(n, T, test_mode=True).tolist() == [expected]


def test_uniform_multi_view_test():
    assert uniform_indices(80, 8, num_views=2, test_mode=True).tolist() == [
        [2, 12, 22, 32, 42, 52, 62, 72], [7, 17, 27, 37, 47, 57, 67, 77]]


@pytest.mark.parametrize('n', [1, 5, 30, 113, 127, 128, 129, 300])
def test_train_sampling_in_range_and_reproducible(n):
    for fn in (lambda r: dense_indices(n, 8, 16, 1, False, r), lambda r: dense_indices(n, 8, 4, 3, False, r),
               lambda r: uniform_indices(n, 8, 1, False, r)):
        draws = [fn(np.random.default_rng(s)) for s in range(30)]
        assert all(d.min() >= 0 and d.max() < n for d in draws)
        assert all(np.array_equal(fn(np.random.default_rng(s)), d) for s, d in enumerate(draws))   # reproducible
        assert all(np.all(np.diff(d, axis=-1) >= 0) for d in draws) or n < 8 * 16                # in temporal order
    if n >= 300:
        starts = {int(dense_indices(n, 8, 16, 1, False, np.random.default_rng(s))[0, 0]) for s in range(400)}
        assert min(starts) >= 0 and max(starts) <= n - 8 * 16 and len(starts) > 50               # mmaction2 train range
        u = np.stack([uniform_indices(n, 8, 1, False, np.random.default_rng(s))[0] for s in range(200)])
        seg = n / 8
        assert all((u[:, i] >= int(i * seg)).all() and (u[:, i] < int((i + 1) * seg) + 1).all() for i in range(8))


def test_dataset_train_sampling_reproducible_from_seed(tmp_path):
    syn = make_synthetic_dataset(tmp_path / 'syn', num_classes=2, train_per_class=2, val_per_class=0, num_frames=24,
                                 size=48, ssv2=False)
    ds = build_dataset('synthetic', 'train', data_root=syn.root, num_frames=4, input_size=32)
    def epoch(seed):
        return [(b['index'].tolist(), b['video'].clone()) for b in build_loader(ds, batch_size=2, seed=seed)]
    torch.manual_seed(1); a = epoch(3)
    torch.manual_seed(1); b = epoch(3)
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_parse_views():
    assert [parse_views(v) for v in ('1x1', '3x1', '1x3', '10x3')] == [(1, 1), (3, 1), (1, 3), (10, 3)]
    for bad in ('3', '2x2', 'ax1', '0x1'):
        with pytest.raises(ValueError, match='views'): parse_views(bad)


# ---------------------------------------------------------------- annotations
def _k400_tree(d: Path, layout: str):
    vids = {'abseiling': ['aaaaaaaaaaa_000010_000020', 'bbbbbbbbbbb_000000_000010'],
            'zumba': ['-ccccccc_cc_000123_000133'], "massaging person's head": ['ddddddddddd_000001_000011']}
    for lab, stems in vids.items():
        folder = d / 'train' / (lab if layout == 'per_class' else '')
        folder.mkdir(parents=True, exist_ok=True)
        for s in stems: (folder / f'{s}.mp4').touch()
    return vids


@pytest.mark.parametrize('layout', ['flat', 'per_class'])
@pytest.mark.parametrize('is_cc', [True, False])
def test_k400_csv_official_format(tmp_path, layout, is_cc):
    _k400_tree(tmp_path, layout)
    head = 'label,youtube_id,time_start,time_end,split' + (',is_cc' if is_cc else '')
    cc = ',0' if is_cc else ''
    rows = ['abseiling,aaaaaaaaaaa,10,20,train', 'abseiling,bbbbbbbbbbb,0,10,train', 'zumba,-ccccccc_cc,123,133,train',
            '"massaging person\'s head",ddddddddddd,1,11,train', 'zumba,gonegonegon,5,15,train']
    (tmp_path / 'train.csv').write_text(head + '\n' + ''.join(r + cc + '\n' for r in rows))
    a = read_k400_csv(tmp_path / 'train.csv', tmp_path / 'train')
    assert a.classes == ['abseiling', "massaging person's head", 'zumba']           # alphabetical by default
    assert [(Path(p).stem, l) for p, l, _ in a.samples] == [
        ('aaaaaaaaaaa_000010_000020', 0), ('bbbbbbbbbbb_000000_000010', 0), ('-ccccccc_cc_000123_000133', 2),
        ('ddddddddddd_000001_000011', 1)]
    assert a.missing == [(f'{tmp_path / "train.csv"}:6', str(tmp_path / 'train' / 'gonegonegon_000005_000015.mp4'))]
    # a given class order (e.g. the released checkpoints' JSON list) wins over alphabetical
    order = ['zumba', 'abseiling', "massaging person's head"]
    (tmp_path / 'classes.json').write_text(json.dumps(order))
    b = read_k400_csv(tmp_path / 'train.csv', tmp_path / 'train', classes=tmp_path / 'classes.json')
    assert b.classes == order and [l for _, l, _ in b.samples] == [1, 1, 0, 2]
    ds = build_dataset('k400', 'train', data_root=tmp_path / 'train', ann_file=tmp_path / 'train.csv', classes=order)
    assert ds.classes == order and ds.num_classes == 3 and len(ds) == 4
    assert ds.skip_summary()['missing_files'] == 1


def test_k400_csv_columns_in_any_order_and_name():
    assert k400_name('abc', 5, 15.0) == 'abc_000005_000015'


@pytest.mark.parametrize('text,line,msg', [
    ('label,youtube_id,time_start\nzumba,x,1\n', 1, 'lacks'),
    ('label,youtube_id,time_start,time_end,split\nzumba,xyz,1,11,train\nzumba,xyz,1,11\n', 3, 'fields'),
    ('label,youtube_id,time_start,time_end,split\nzumba,xyz,1,11,train\n\nzumba,xyz,a,11,train\n', 4, 'not numbers'),
    ('label,youtube_id,time_start,time_end,split\nzumba,,1,11,train\n', 2, 'youtube_id'),
])
def test_k400_csv_malformed_names_file_and_line(tmp_path, text, line, msg):
    (tmp_path / 'bad.csv').write_text(text)
    with pytest.raises(AnnotationError, match=msg) as e: read_k400_csv(tmp_path / 'bad.csv', tmp_path)
    assert f'bad.csv:{line}:' in str(e.value) and e.value.line == line


def test_k400_unknown_label_in_given_class_list(tmp_path):
    (tmp_path / 'a.csv').write_text('label,youtube_id,time_start,time_end,split\nzumba,x,1,11,train\nsalsa,y,1,11,train\n')
    with pytest.raises(AnnotationError, match=r"a\.csv:3: label 'salsa'"): read_k400_csv(tmp_path / 'a.csv', classes=['zumba'])


SSV2_LABELS = {'Holding something': '0', 'Pushing something from left to right': '1',
               'Pushing something from right to left': '2', 'Putting something on a surface': '3'}


def _ssv2_files(d: Path, items):
    (d / 'something-something-v2-labels.json').write_text(json.dumps(SSV2_LABELS, indent=4))
    (d / 'something-something-v2-train.json').write_text(json.dumps(items, indent=4))
    (d / 'videos').mkdir(exist_ok=True)
    for it in items:
        if isinstance(it, dict) and 'id' in it: (d / 'videos' / f'{it["id"]}.webm').touch()


def test_ssv2_json_templates_with_brackets(tmp_path):
    items = [
        {'id': '78687', 'label': 'holding potato next to vicks vaporub bottle', 'template': 'Holding [something]', 'placeholders': ['potato']},
        # the caption says right-to-left; the class comes from the template
        {'id': '42326', 'label': 'pushing a pen from right to left', 'template': 'Pushing [something] from left to right', 'placeholders': ['a pen']},
        {'id': '100904', 'label': 'putting a cup on a table', 'template': 'Putting [something] on a surface', 'placeholders': ['a cup']},
        {'id': '3', 'label': 'x', 'template': 'Pushing [something] from right to left', 'placeholders': ['x']},
    ]
    _ssv2_files(tmp_path, items)
    a = read_ssv2_json(tmp_path / 'something-something-v2-train.json', tmp_path / 'something-something-v2-labels.json', tmp_path / 'videos')
    assert a.classes == list(SSV2_LABELS)
    assert [(Path(p).name, l) for p, l, _ in a.samples] == [('78687.webm', 0), ('42326.webm', 1), ('100904.webm', 3), ('3.webm', 2)]
    (tmp_path / 'videos' / '3.webm').unlink()
    ds = build_dataset('ssv2', 'train', data_root=tmp_path / 'videos', ann_file=tmp_path / 'something-something-v2-train.json')
    assert len(ds) == 3 and ds.sampling == 'uniform' and ds.flip.mode == 'off'
    assert ds.skip_summary()['missing'] == [str(tmp_path / 'videos' / '3.webm')]
    with pytest.raises(ValueError, match='never dense'):
        build_dataset('ssv2', 'train', data_root=tmp_path / 'videos', ann_file=tmp_path / 'something-something-v2-train.json', sampling='dense')


@pytest.mark.parametrize('text,line,msg', [
    ('[\n  {"id": "1", "template": "Holding [something]"},\n  {"id": "2", "label": "x"}\n]', 3, 'template'),
    ('[\n  {"id": "1", "template": "Holding [something]"},\n  {"id": "2", "template": "Juggling [something]"}\n]', 3, 'not in'),
    ('[\n  {"id": "1", "template": "Holding [something]"},\n  {"id": "2", "template": \n]', 4, 'invalid JSON'),
    ('{"id": "1"}', 1, 'expected a JSON list'),
])
def test_ssv2_malformed_names_file_and_line(tmp_path, text, line, msg):
    _ssv2_files(tmp_path, [])
    (tmp_path / 'bad.json').write_text(text)
    with pytest.raises(AnnotationError, match=msg) as e:
        read_ssv2_json(tmp_path / 'bad.json', tmp_path / 'something-something-v2-labels.json', tmp_path / 'videos')
    assert f'bad.json:{line}' in str(e.value)


def test_list_file_and_class_lists(tmp_path):
    (tmp_path / 'v').mkdir(); (tmp_path / 'v' / 'my clip.mp4').touch(); (tmp_path / 'v' / 'b.avi').touch()
    (tmp_path / 'train.txt').write_text('# path label\nmy clip.mp4 1\nb.avi cat\n\nnot_there.mp4 0\n')
    a = read_list_file(tmp_path / 'train.txt', tmp_path / 'v', classes=['dog', 'cat'])
    assert [(Path(p).name, l) for p, l, _ in a.samples] == [('my clip.mp4', 1), ('b.avi', 1)]
    assert a.missing[0][0].endswith('train.txt:5')
    (tmp_path / 'bad.txt').write_text('b.avi 0\nb.avi 7\n')
    with pytest.raises(AnnotationError, match=r'bad\.txt:2: label 7 outside'): read_list_file(tmp_path / 'bad.txt', tmp_path / 'v', ['dog', 'cat'])
    (tmp_path / 'c.json').write_text(json.dumps({'b': 1, 'a': 0})); assert read_class_list(tmp_path / 'c.json') == ['a', 'b']
    (tmp_path / 'c.txt').write_text('x\ny\nx\n')
    with pytest.raises(ValueError, match='duplicate'): read_class_list(tmp_path / 'c.txt')


# ---------------------------------------------------------------- transforms
def test_train_transform_same_parameters_for_every_frame():
    ds = VideoClipDataset.from_settings([], ['a', 'b'], train=True, num_frames=6, input_size=32,
                          rand_augment='rand-m7-n4-mstd0.5-inc1', flip=FlipPolicy('plain', p=0.5))
    for seed in range(25):
        torch.manual_seed(seed)
        frame = torch.randint(0, 256, (1, 3, 48, 64), dtype=torch.uint8)
        (v,), _ = ds.transform(frame.repeat(6, 1, 1, 1), 0)
        assert v.shape == (6, 3, 32, 32) and v.dtype == torch.uint8
        assert all(torch.equal(v[0], v[t]) for t in range(6)), seed


def test_rand_augment_spec():
    ra = ClipRandAugment.from_string('rand-m7-n4-mstd0.5-inc1')
    assert (ra.n, ra.m, ra.mstd, ra.p) == (4, 7.0, 0.5, 0.5) and len(ra.ops) == 15
    for bad in ('rand-m7-n4', 'augmix-m5', 'rand-q3-inc1'):
        with pytest.raises(ValueError, match='rand_augment'): ClipRandAugment.from_string(bad)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    outs = [ClipRandAugment(n=4, m=7, mstd=0.5)(x) for _ in range(10)]
    assert sum(not torch.equal(o, x) for o in outs) >= 5      # it does augment


def test_crops_resize_and_normalize():
    v = torch.arange(100 * 160, dtype=torch.int32).reshape(1, 1, 100, 160).expand(2, 3, 100, 160).to(torch.uint8)
    assert resize_short(v, 50).shape == (2, 3, 50, 80) and resize_short(v.transpose(-1, -2), 50).shape == (2, 3, 80, 50)
    left, mid, right = three_crop(v, 100)
    assert torch.equal(left, v[..., :100]) and torch.equal(mid, v[..., 30:130]) and torch.equal(right, v[..., 60:])
    top, _, bottom = three_crop(v.transpose(-1, -2), 100)
    assert torch.equal(top, v.transpose(-1, -2)[..., :100, :]) and torch.equal(bottom, v.transpose(-1, -2)[..., 60:, :])
    assert torch.equal(center_crop(v, 100), v[..., 30:130])
    x = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    y = normalize_clip(x)
    assert y.dtype == torch.float32 and torch.allclose(y, ref, atol=1e-6)
    with pytest.raises(ValueError, match='3, T, H, W'): normalize_clip(torch.zeros(2, 4, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.cuda
def test_normalize_clip_on_cuda():
    x = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    g = normalize_clip(x, device='cuda')
    assert g.is_cuda and torch.allclose(g.cpu(), normalize_clip(x), atol=1e-6)


def test_test_views_shapes(tmp_path):
    syn = make_synthetic_dataset(tmp_path / 'syn', num_classes=2, train_per_class=1, val_per_class=1, num_frames=20,
                                 size=48, ssv2=False)
    for views, V in (('1x1', None), ('3x1', 3), ('1x3', 3), ('2x3', 6)):
        ds = build_dataset('synthetic', 'val', data_root=syn.root, num_frames=4, input_size=32, views=views)
        assert ds[0]['video'].shape == ((V,) if V else ()) + (3, 4, 32, 32) and ds.num_views == (V or 1)
    with pytest.raises(ValueError, match='one view'):
        build_dataset('synthetic', 'train', data_root=syn.root, views='3x1')


# ---------------------------------------------------------------- flip policy
def test_lr_flip_pairs_on_ssv2_names():
    names = ['Pushing something from left to right', 'Pushing something from right to left', 'Holding something',
             'Turning the camera left while filming something', 'Turning the camera right while filming something',
             'Moving something and something away from each other', 'Pulling something from left to right',
             'Pulling something from right to left', 'Dropping something next to something on the left only']
    pairs, never = lr_flip_pairs(names)
    assert pairs == {0: 1, 1: 0, 3: 4, 4: 3, 6: 7, 7: 6} and never == {8}
    with pytest.raises(ValueError, match='symmetric'): FlipPolicy('swap', {0: 1})


def test_flip_policy_swaps_and_respects_never():
    v = torch.arange(12, dtype=torch.uint8).reshape(1, 1, 3, 4).repeat(2, 3, 1, 1)
    pol = FlipPolicy('swap', {0: 1, 1: 0}, never={3}, p=1.0)
    fv, lab, flipped = pol(v, 0); assert flipped and lab == 1 and torch.equal(fv, v.flip(-1))
    assert pol(v, 2)[1:] == (2, True)                 # no direction: flips, label kept
    assert pol(v, 3)[1:] == (3, False)                # a direction without a mirror: never flipped
    assert FlipPolicy('off', p=1.0)(v, 0)[1:] == (0, False)


def _horizontal_motion(video):
    "Sign of the object's horizontal motion in a (3, T, H, W) clip: centroid of |frame - temporal median|."
    x = video.float()
    diff = (x - x.median(dim=1, keepdim=True).values).abs().sum(0)           # (T, H, W)
    w = diff.sum(1)                                                          # (T, W)
    cols = torch.arange(w.shape[-1], dtype=torch.float32)
    cx = (w * cols).sum(-1) / w.sum(-1).clamp(min=1e-6)
    return float(cx[-1] - cx[0])


def test_ssv2_training_flip_never_mislabels(tmp_path):
    "With flip on, every clip that shows left-to-right motion carries the left-to-right label, and flips did happen."
    syn = make_synthetic_dataset(tmp_path / 'syn', num_classes=2, train_per_class=8, val_per_class=0, num_frames=16,
                                 size=64, seed=1)
    kw = dict(data_root=syn.ssv2_videos, ann_file=syn.ssv2_train, num_frames=8, input_size=48, rand_augment=None,
              crop_scale=(0.8, 1.0))   # keep the object in view so its motion can be measured
    assert build_dataset('ssv2', 'train', **kw).flip.mode == 'off'              # default: off for SSv2
    ds = build_dataset('ssv2', 'train', flip=True, **kw)
    assert ds.flip.mode == 'swap' and ds.flip.pairs == {0: 1, 1: 0}
    ltr = ds.classes.index('Moving something from left to right')
    torch.manual_seed(0)
    swapped = 0
    for _ in range(3):
        for i in range(len(ds)):
            it = ds[i]
            moving_right = _horizontal_motion(it['video']) > 0
            assert moving_right == (it['label'] == ltr), (i, it['label'])
            swapped += it['label'] != ds.samples[i][1]
    assert 8 <= swapped <= 40
    # the same check catches a policy that flips without swapping
    ds.flip = FlipPolicy('plain', p=1.0)
    wrong = sum((_horizontal_motion(ds[i]['video']) > 0) != (ds[i]['label'] == ltr) for i in range(len(ds)))
    assert wrong == len(ds)


# ---------------------------------------------------------------- broken files
def test_broken_files_skipped_and_counted_with_workers(tmp_path):
    good = []
    for i in range(6):
        fr, _ = render_clip(i % 2, 20, 48, 64, rng=i)
        good.append(write_video(tmp_path / 'good' / f'g{i}.mp4', fr))
    broken = make_broken_files(tmp_path / 'broken', good_clip=good[0])
    one, _ = render_clip(1, 1, 48, 64, rng=0)                       # one frame: loads (issue 9, point 4)
    good.append(write_video(tmp_path / 'good' / 'one_frame.mp4', one))
    lines = [f'{p} {i % 2}' for i, p in enumerate(good + list(broken))] + [f'{tmp_path}/absent.mp4 0']
    (tmp_path / 'list.txt').write_text('\n'.join(lines) + '\n')
    ds = build_dataset('list', 'train', ann_file=tmp_path / 'list.txt', num_frames=4, frame_interval=2, input_size=32)
    assert len(ds) == 11 and ds.skip_summary()['missing_files'] == 1
    loader = build_loader(ds, batch_size=3, num_workers=2)
    for epoch in range(2):
        seen = []
        for b in loader:
            assert b['video'].shape[1:] == (3, 4, 32, 32)
            seen += b['index'].tolist()
        assert sorted(seen) == list(range(7))
        assert {s['path']: s['reason'] for s in loader.epoch_skipped} == {str(p): k for p, k in broken.items()}
    s = ds.skip_summary()
    assert s['skipped_files'] == 4 and s['skip_events'] == 8
    assert s['by_reason'] == {'empty': 1, 'unreadable': 1, 'truncated': 1, 'no_video_stream': 1, 'missing': 1}
    assert s['missing'] == [f'{tmp_path}/absent.mp4']


# ---------------------------------------------------------------- sparse class ids (issue 9, point 3)
SSV2_CUT = {'Holding something': '0', 'Tearing something into two pieces': '32',
            'Pushing something from left to right': '93', 'Pushing something from right to left': '94',
            'Uncovering something': '135'}


def test_ssv2_labels_cut_keeps_official_ids(tmp_path):
    "A labels JSON cut from the official one keeps its indices: they are the 174-way checkpoints' class ids."
    from evl_nb.annotations import class_ids, pad_classes
    (tmp_path / 'something-something-v2-labels.json').write_text(json.dumps(SSV2_CUT, indent=4))
    tmpl = {'0': 'Holding [something]', '32': 'Tearing [something] into two pieces', '93': 'Pushing [something] from left to right',
            '94': 'Pushing [something] from right to left'}      # 135 has no sample: fine
    items = [{'id': str(100 + k), 'label': 'x', 'template': t, 'placeholders': ['x']} for k, t in enumerate(tmpl.values())]
    (tmp_path / 'something-something-v2-train.json').write_text(json.dumps(items, indent=4))
    (tmp_path / 'v').mkdir()
    for it in items: (tmp_path / 'v' / f'{it["id"]}.webm').touch()
    ds = build_dataset('ssv2', 'train', data_root=tmp_path / 'v', ann_file=tmp_path / 'something-something-v2-train.json')
    assert [l for _, l, _ in ds.samples] == [0, 32, 93, 94]
    assert ds.num_classes == 136 and ds.class_ids == [0, 32, 93, 94, 135] and ds.fixed_class_ids
    assert ds.classes[93] == 'Pushing something from left to right' and ds.classes[1] is None
    assert ds.flip.mode == 'off'
    assert build_dataset('ssv2', 'train', data_root=tmp_path / 'v', ann_file=tmp_path / 'something-something-v2-train.json',
                         flip=True).flip.pairs == {93: 94, 94: 93}
    head = pad_classes(ds.classes, 174)
    assert len(head) == 174 and class_ids(head) == [0, 32, 93, 94, 135]
    with pytest.raises(ValueError, match='class id 135'): pad_classes(ds.classes, 100)


@pytest.mark.parametrize('fmt', ['json_dict', 'json_list', 'txt_indexed'])
def test_k400_explicit_sparse_class_list_keeps_ids(tmp_path, fmt):
    _k400_tree(tmp_path, 'flat')
    (tmp_path / 'train.csv').write_text('label,youtube_id,time_start,time_end,split\n'
                                        'abseiling,aaaaaaaaaaa,10,20,train\nzumba,-ccccccc_cc,123,133,train\n')
    ids = {'abseiling': 0, 'zumba': 399, 'yoga': 398}
    f = tmp_path / ('classes.txt' if fmt == 'txt_indexed' else 'classes.json')
    if fmt == 'json_dict': f.write_text(json.dumps(ids))
    elif fmt == 'json_list': f.write_text(json.dumps(['abseiling'] + [None] * 397 + ['yoga', 'zumba']))
    else: f.write_text(''.join(f'{i} {n}\n' for n, i in ids.items()))
    ds = build_dataset('k400', 'train', data_root=tmp_path / 'train', ann_file=tmp_path / 'train.csv', classes=f)
    assert [l for _, l, _ in ds.samples] == [0, 399] and ds.num_classes == 400 and ds.class_ids == [0, 398, 399]
    assert ds.fixed_class_ids and ds.classes[399] == 'zumba' and ds.classes[5] is None


def test_class_list_errors_name_the_file(tmp_path):
    (tmp_path / 'c.json').write_text(json.dumps({'a': 3, 'b': 3}))
    with pytest.raises(AnnotationError, match=r'c\.json: class index 3'): read_class_list(tmp_path / 'c.json')
    (tmp_path / 'l.txt').write_text('x.mp4 1\n'); (tmp_path / 'x.mp4').touch()
    with pytest.raises(AnnotationError, match=r'l\.txt:1: label 1 has no name'):
        read_list_file(tmp_path / 'l.txt', classes=['a', None, 'c'])
    with pytest.raises(ValueError, match='has no name'): VideoClipDataset.from_settings([('x.mp4', 1)], ['a', None])


# ---------------------------------------------------------------- warn once per file (issue 9, point 5)
@pytest.mark.parametrize('num_workers,plain', [(0, False), (2, False), (2, True)])
def test_broken_file_drawn_many_times_warned_once_counted_always(tmp_path, num_workers, plain):
    "A truncated file drawn 12 times (by 2 workers too) is warned about once in all processes, and counted 12 times."
    import logging
    from torch.utils.data import DataLoader
    from evl_nb.data import collate_clips
    fr, _ = render_clip(0, 20, 48, 64, rng=0)
    good = write_video(tmp_path / 'good.mp4', fr)
    bad = tmp_path / 'cut.mp4'; bad.write_bytes(good.read_bytes()[:2000])
    (tmp_path / 'list.txt').write_text(f'{good} 0\n{bad} 1\n')
    ds = build_dataset('list', 'train', ann_file=tmp_path / 'list.txt', num_frames=4, frame_interval=2, input_size=32)
    log_file = tmp_path / 'log.txt'
    h = logging.FileHandler(log_file); h.setLevel(logging.WARNING)    # forked workers inherit it and append
    lg = logging.getLogger('evl_nb.data'); lg.addHandler(h)
    draws = [0, 1] * 12
    try:
        if plain:   # a plain DataLoader whose consumer records skips (as the trainer and the evaluator do)
            for b in DataLoader(ds, batch_size=3, sampler=draws, num_workers=num_workers, collate_fn=collate_clips):
                ds.record_skips(b['skipped'])
        else:
            for _ in build_loader(ds, batch_size=3, sampler=draws, num_workers=num_workers): pass
    finally:
        lg.removeHandler(h); h.close()
    warned = [l for l in log_file.read_text().splitlines() if str(bad) in l]
    assert len(warned) == 1 and 'list.txt:2' in warned[0], warned
    s = ds.skip_summary()
    assert s['skip_events'] == 12 and s['skipped_files'] == 1 and s['files'] == {str(bad): 'truncated'}
    assert s['details'] == [dict(path=str(bad), where=f'{tmp_path / "list.txt"}:2', reason='truncated',
                                 message=s['details'][0]['message'], count=12)]
    rep = ds.skip_report()
    assert f'{tmp_path / "list.txt"}:2 {bad}: truncated' in rep and '12 draw(s)' in rep
