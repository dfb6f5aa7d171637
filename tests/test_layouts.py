"""Datasets as they are downloaded (issue 25, points 1-3): a miniature of every known K400 / SSv2 layout, made of
the synthetic set's real tiny videos, is found from `dataset` + `data_root` alone; missing videos are counted and
listed; nothing found stops early, naming the folders searched."""
import json, logging, shutil, time
from pathlib import Path

import pytest

from evl_nb.annotations import resolve_layout
from evl_nb.data import build_dataset
from evl_nb.train import TrainConfig, build_datasets
from miniatures import LAYOUTS, SPLITS, expected_files as _expected, k400_rows as _k400_rows, make_layout as _make


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    from evl_nb.synthetic import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp('syn') / 'syn', num_classes=3, train_per_class=2,
                                  val_per_class=1, num_frames=(8, 8))


def _cfg(dataset, root, out, **kw):
    return TrainConfig(dataset=dataset, data_root=str(root), model='evl-tiny', num_workers=0, output_dir=str(out),
                       progress=False, eval_views='1x1', **kw).resolve()


class _Logged(logging.Handler):
    "The evl_nb log lines (its logger does not propagate to pytest's caplog)."
    def __init__(self): super().__init__(); self.lines = []
    def emit(self, r): self.lines.append(r.getMessage())
    def __enter__(self): logging.getLogger('evl_nb').addHandler(self); return self
    def __exit__(self, *a): logging.getLogger('evl_nb').removeHandler(self)


@pytest.mark.parametrize('key', list(LAYOUTS))
def test_every_layout_is_found_from_data_root_alone(syn, tmp_path, key):
    dataset, root = _make(syn, tmp_path, key)
    name, vid = LAYOUTS[key][2], LAYOUTS[key][3]
    for split in SPLITS:
        with _Logged() as log: lay = resolve_layout(dataset, split, root)
        assert (lay.name, lay.video_dir) == (name, root / vid(split)), lay
        assert [l for l in log.lines if 'layout' in l] == [lay.describe()]          # one line says what was chosen
        ds = build_dataset(dataset, split, data_root=root, num_frames=8)
        assert sorted(Path(p).name for p, _, _ in ds.samples) == _expected(syn, dataset, split), key
        assert ds.video_counts == dict(annotated=len(ds), found=len(ds), missing=0, unreadable=0)
        if dataset == 'k400' and name != 'mmaction2':                          # the class of every video is kept
            rows = dict((stem, lab) for lab, stem in _k400_rows(syn, split))
            assert all(ds.classes[l] == rows[Path(p).stem] for p, l, _ in ds.samples)
    tr, va = build_datasets(_cfg(dataset, root, tmp_path / 'run'))          # the training job's datasets
    assert (len(tr), len(va)) == (6, 3)


def test_explicit_ann_file_and_video_dir_win(syn, tmp_path):
    dataset, root = _make(syn, tmp_path, 'k400-cvdfoundation')
    other = tmp_path / 'elsewhere'; shutil.copytree(root / 'val', other)
    lay = resolve_layout('k400', 'val', root, ann_file=root / 'annotations' / 'train.csv', video_dir=other)
    assert (lay.name, lay.ann_file, lay.video_dir) == ('given', root / 'annotations' / 'train.csv', other)
    ds = build_dataset('k400', 'val', data_root=root, video_dir=other)
    assert len(ds) == 3 and all(Path(p).parent == other for p, _, _ in ds.samples)


@pytest.mark.parametrize('key', ['ssv2-20bn-root', 'k400-cvdfoundation'])
def test_nothing_found_fails_early_naming_the_folders(syn, tmp_path, monkeypatch, key):
    import evl_nb.train as T
    dataset, root = _make(syn, tmp_path, key)
    vids = root / LAYOUTS[key][3]('train')
    for f in list(vids.rglob('*.mp4')) + list(vids.rglob('*.webm')): f.unlink()
    monkeypatch.setattr(T, 'train', lambda *a, **k: pytest.fail('a model was built'))
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e: T.run(_cfg(dataset, root, tmp_path / 'run'))
    msg = str(e.value)
    assert time.time() - t0 < 30
    assert f'folders searched: {vids}' in msg and 'none of the 6 videos annotated in' in msg, msg
    assert f'expected e.g. {vids}/' in msg and msg.count('folders searched') == 1, msg
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_missing_videos_are_counted_and_listed(syn, tmp_path):
    dataset, root = _make(syn, tmp_path, 'k400-cvdfoundation')
    gone = {split: sorted((root / split).glob('*.mp4'))[:n] for split, n in (('train', 2), ('val', 1))}
    for fs in gone.values():
        for f in fs: f.unlink()
    out = tmp_path / 'run'
    with _Logged() as log: tr, va = build_datasets(_cfg(dataset, root, out))
    assert tr.video_counts == dict(annotated=6, found=4, missing=2, unreadable=0)
    assert va.video_counts == dict(annotated=3, found=2, missing=1, unreadable=0)
    for split, fs in gone.items():
        listed = (out / f'missing_{split}.txt').read_text().splitlines()
        assert sorted(l.split('\t')[0] for l in listed) == sorted(map(str, fs))
        line = [l for l in log.lines if l.startswith(f'k400/{split}: ') and 'annotated videos found' in l]
        assert len(line) == 1 and str(out / f'missing_{split}.txt') in line[0], log.lines
    assert any('4 of 6 annotated videos found (66.7%), 2 missing' in l for l in log.lines)
    with pytest.raises(ValueError, match=r'more than max_missing=0\.2'):
        build_datasets(_cfg(dataset, root, out, max_missing=0.2))
    with pytest.raises(ValueError, match='max_missing=1.5'): _cfg(dataset, root, out, max_missing=1.5)


def test_summary_json_carries_the_counts(syn, tmp_path):
    "A short run on a copy missing 1 of 3 val and 2 of 6 train videos: summary.json says what was scored of what."
    from evl_nb.train import run
    dataset, root = _make(syn, tmp_path, 'k400-cvdfoundation')
    for split, n in (('train', 2), ('val', 1)):
        for f in sorted((root / split).glob('*.mp4'))[:n]: f.unlink()
    out = tmp_path / 'run'
    run(TrainConfig(dataset='k400', data_root=str(root), model='evl-tiny', num_classes=3, batch_size=2, max_steps=1,
                    num_workers=0, output_dir=str(out), progress=False, eval_views='1x1', threads=1,
                    model_overrides=dict(decoder_num_layers=1)))
    s = json.loads((out / 'summary.json').read_text())
    assert s['videos'] == dict(train=dict(annotated=6, found=4, missing=2, unreadable=0),
                               val=dict(annotated=3, found=2, missing=1, unreadable=0, scored=2))
    assert (s['val']['num_samples'], s['val']['num_annotated'], s['val']['num_missing']) == (2, 3, 1)
