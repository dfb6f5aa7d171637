"""The clip store: same frame counts and indices as the videos, frames within JPEG loss of the sequential decode,
a converter that survives SIGKILL, broken sources listed and skipped."""
import csv, json, os, shutil, signal, subprocess, sys, tarfile, time, zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_path
from evl_nb.transforms import dense_indices, uniform_indices
from evl_nb.store import (ClipStore, build_store, fit_short_side, read_index, verify_clip_file, StoreError,
                          MANIFEST_COLUMNS, STORE_REASONS, pack_frames, read_jpegs)
from evl_nb.video import check_video, read_frames_pyav, VIDEO_EXTS, TruncatedVideoError

REPO = Path(__file__).resolve().parents[1]


def fixture_videos():
    d = fixture_path('videos')
    return sorted(p for p in d.iterdir() if p.suffix.lower() in VIDEO_EXTS)


@pytest.fixture(scope='module')
def fixture_store(tmp_path_factory):
    vids = fixture_videos()
    return vids, build_store(vids, tmp_path_factory.mktemp('store') / 'store', num_workers=2, progress=False)


def sampling_patterns(n, seed):
    "Train and test indices as the datasets draw them: dense 8x16 (1 and 3 views) and uniform 8 (1 and 2 views)."
    rng = np.random.default_rng(seed)
    return {'dense train': dense_indices(n, 8, 16, 1, False, rng), 'dense test 3': dense_indices(n, 8, 16, 3, True),
            'uniform train': uniform_indices(n, 8, 1, False, rng), 'uniform test 2': uniform_indices(n, 8, 2, True)}


def psnr(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def test_store_same_indices_and_frames_within_jpeg_loss(fixture_store, checked_clips):
    vids, store = fixture_store
    assert store.last_build['failed'] == 0 and len(store) == len(vids)
    for p in vids:
        info, sinfo = checked_clips.of(p), store.info(p)              # check_video(p), once a session
        assert sinfo.frames == info.frames, p.name            # the sequential decode count, not the container's
        pats = {(seed, name): (a, sampling_patterns(sinfo.frames, seed)[name])
                for seed in (0, 1) for name, a in sampling_patterns(info.frames, seed).items()}
        union = sorted({int(i) for a, _ in pats.values() for i in a.reshape(-1)})
        ref = fit_short_side(torch.from_numpy(read_frames_pyav(p, union)).permute(0, 3, 1, 2), 320)
        ref = dict(zip(union, ref.permute(0, 2, 3, 1).numpy()))          # one sequential decode per video
        for (seed, name), (a, b) in pats.items():
            np.testing.assert_array_equal(a, b)
            idx = a.reshape(-1).tolist()
            got, want = store.read_frames(p, idx), np.stack([ref[i] for i in idx])
            assert got.shape == want.shape and got.dtype == np.uint8
            q = psnr(got, want)
            assert q >= 38, f'{p.name} {name} seed {seed}: PSNR {q:.1f} dB'


def test_store_lookup_by_key_stem_and_source(fixture_store, checked_clips):
    vids, store = fixture_store
    p = vids[0]
    assert store.key(p) == p.name and store.key(p.name) == p.name
    assert store.key(Path('/other/machine') / p.name) == p.name          # by stem
    assert store.info('/nowhere/not_there.mp4').error == 'missing'
    idx = read_index(store.file(p))
    assert idx['frames'] == checked_clips.of(p).frames and idx['source'] == str(p)
    out = subprocess.run(['tar', '-tf', str(store.file(p))], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == 'index.json' and out[1:] == [f'{i:06d}.jpg' for i in range(idx['frames'])]


def _copy_tree(n_copies, dst):
    "A K400-like folder of real clips (copies, so each file converts on its own)."
    vids = [v for v in fixture_videos() if v.suffix == '.mp4']
    for k in range(n_copies):
        v = vids[k % len(vids)]
        d = dst / f'class_{k % 2}'; d.mkdir(parents=True, exist_ok=True)
        (d / f'vid{k:02d}_000000_000010.mp4').write_bytes(v.read_bytes())
    return dst


def test_sigkill_mid_build_then_rerun_gives_complete_verified_store(checked_clips, tmp_path):
    src, out = _copy_tree(8, tmp_path / 'src'), tmp_path / 'store'
    code = ('import sys; from evl_nb.store import build_store; '
            'build_store(sys.argv[1], sys.argv[2], num_workers=2, progress=False)')
    proc = subprocess.Popen([sys.executable, '-c', code, str(src), str(out)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done, t0 = [], time.time()
    try:
        while time.time() - t0 < 300 and proc.poll() is None:
            done = list((out / 'frames').rglob('*.tar')) if (out / 'frames').exists() else []
            if done: break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                  # the whole run: main process and its workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the converter finished before it could be killed'
    assert done and not (out / 'manifest.csv').exists()
    left = len(list((out / 'frames').rglob('*.tar')))
    assert left < 8, 'all videos were converted before the kill'
    # a half-written file where a finished one should be (e.g. copied by hand, or a disk hiccup): it must be redone
    victim = sorted((out / 'frames').rglob('*.tar'))[0]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    with pytest.raises(StoreError): verify_clip_file(victim, 'index')
    store = build_store(src, out, num_workers=1, progress=False)
    assert store.last_build['videos'] == 8 and store.last_build['failed'] == 0
    assert store.last_build['skipped'] == left - 1 and store.last_build['converted'] == 8 - left + 1
    assert not list((out / 'frames').rglob('*.tmp-*'))
    assert store.verify('full') == {}
    clips = {v.read_bytes(): v for v in fixture_videos()}     # 8 copies of 6 clips: each clip's count checked once
    for p in sorted(src.rglob('*.mp4')):
        assert store.info(p).frames == checked_clips.of(clips[p.read_bytes()]).frames, p
    again = build_store(src, out, num_workers=1, progress=False, verify='tar')
    assert again.last_build['skipped'] == 8 and again.last_build['converted'] == 0


def test_broken_sources_listed_with_their_error_and_skipped(tmp_path):
    vids = fixture_path('videos')
    src = tmp_path / 'src'; src.mkdir()
    (src / 'good.mp4').write_bytes((vids / 'carphone_pristine.mp4').read_bytes())
    (src / 'cut.mp4').write_bytes((vids / 'bikes.mp4').read_bytes()[:30000])
    (src / 'zero.mp4').touch()
    (src / 'page.mp4').write_text('<html>not found</html>' * 40)
    store = build_store(src, tmp_path / 'store', num_workers=2, progress=False)
    rows = {r['key']: r for r in csv.DictReader(open(tmp_path / 'store' / 'manifest.csv'))}
    assert list(next(csv.reader(open(tmp_path / 'store' / 'manifest.csv')))) == MANIFEST_COLUMNS
    assert {k: r['error'] for k, r in rows.items()} == {'good.mp4': '', 'cut.mp4': 'truncated', 'zero.mp4': 'empty',
                                                        'page.mp4': 'unreadable'}
    assert all(r['message'] and str(src / k) in r['message'] for k, r in rows.items() if r['error'])
    assert rows['good.mp4']['frames'] == '120' and int(rows['good.mp4']['bytes']) > 0
    assert store.last_build == dict(videos=4, converted=1, skipped=0, failed=3)
    assert sorted(p.name for p in (tmp_path / 'store' / 'frames').rglob('*.tar')) == ['good.mp4.tar']
    assert store.info(src / 'cut.mp4').error == 'truncated'
    with pytest.raises(TruncatedVideoError, match='cut.mp4'): store.read_frames(src / 'cut.mp4', [0])


def test_annotation_file_source_lists_missing_videos(tmp_path):
    src = _copy_tree(2, tmp_path / 'k400')
    (src / 'train.csv').write_text('label,youtube_id,time_start,time_end,split\n'
                                   'a,vid00,0,10,train\nb,vid01,0,10,train\nb,gone,0,10,train\n')
    store = build_store(src / 'train.csv', tmp_path / 'store', num_workers=1, progress=False)
    assert store.last_build == dict(videos=3, converted=2, skipped=0, failed=1)
    assert store.rows['gone_000000_000010']['error'] == 'missing'
    assert store.key(src / 'class_1' / 'vid01_000000_000010.mp4') == 'class_1/vid01_000000_000010.mp4'


@pytest.mark.cuda            # nvjpeg
def test_gpu_decode_matches_cpu(fixture_store):
    vids, store = fixture_store
    p = vids[0]; idx = [0, 9, 17, 3]
    g, c = store.read_tensor(p, idx, device='cuda'), store.read_tensor(p, idx)
    assert g.device.type == 'cuda' and g.shape == c.shape and g.dtype == torch.uint8
    assert (g.cpu().float() - c.float()).abs().mean() < 1.5
    b = store.read_batch([(p, idx), (vids[1], [1, 2])], device='cuda')
    assert [tuple(x.shape[:2]) for x in b] == [(4, 3), (2, 3)]


@pytest.mark.parametrize('sampling', ['dense', 'uniform'])
def test_dataset_reads_store_with_the_same_indices_as_the_videos(fixture_store, checked_clips, tmp_path, sampling):
    "build_dataset(..., store=...): for train and test, the same seed draws the same indices as reading the videos."
    from evl_nb.data import build_dataset
    vids, store = fixture_store
    lst = tmp_path / 'list.txt'
    lst.write_text(''.join(f'{p} {k % 2}\n' for k, p in enumerate(vids)))
    for split, views in (('train', '1x1'), ('test', '3x1')):
        kw = dict(ann_file=lst, num_frames=8, sampling=sampling, views=views, input_size=112)
        a = build_dataset('list', split, manifest={str(p.resolve()): checked_clips.of(p) for p in vids}, **kw)
        b = build_dataset('list', split, store=store.root, **kw)
        for i in range(len(vids)):
            for seed in ((0, 7) if split == 'train' else (0,)):    # test views draw nothing: one read says it
                torch.manual_seed(seed); ia, fa = a.read_frames(i)
                torch.manual_seed(seed); ib, fb = b.read_frames(i)
                np.testing.assert_array_equal(ia, ib)
                ref = fit_short_side(torch.from_numpy(fa).permute(0, 3, 1, 2), 320).permute(0, 2, 3, 1).numpy()
                assert psnr(fb, ref) >= 38, (vids[i].name, split, seed)
        item = b[0]
        assert item['video'].dtype == torch.uint8 and item['video'].shape[-2:] == (112, 112)


def test_dataset_skips_a_video_the_store_could_not_convert(tmp_path):
    from evl_nb.data import build_dataset, build_loader
    vids = fixture_path('videos')
    src = tmp_path / 'src'; src.mkdir()
    (src / 'good.mp4').write_bytes((vids / 'carphone_pristine.mp4').read_bytes())
    (src / 'cut.mp4').write_bytes((vids / 'bikes.mp4').read_bytes()[:30000])
    build_store(src, tmp_path / 'store', num_workers=1, progress=False)
    lst = tmp_path / 'list.txt'; lst.write_text('good.mp4 0\ncut.mp4 1\n')
    ds = build_dataset('list', 'train', data_root=src, ann_file=lst, num_frames=4, input_size=64, store=tmp_path / 'store')
    batch = next(iter(build_loader(ds, batch_size=2, shuffle=False)))
    assert batch['video'].shape == (1, 3, 4, 64, 64)
    assert [(Path(s['path']).name, s['reason']) for s in batch['skipped']] == [('cut.mp4', 'truncated')]
    assert ds.skip_summary()['by_reason'] == {'truncated': 1}


@pytest.mark.slow                # two papermill jobs
def test_train_notebook_trains_tiny_preset_from_a_store(tmp_path):
    "papermill nbs/train.ipynb -p dataset k400 -p data_root <K400 layout> -p store <dir>: trains and evaluates from the store."
    pm = pytest.importorskip('papermill')
    from evl_nb.synthetic import make_synthetic_dataset
    from evl_nb.checkpoints import read_metrics
    root = tmp_path / 'k400'
    make_synthetic_dataset(root, num_classes=4, train_per_class=3, val_per_class=2, num_frames=(8, 8), ssv2=False)
    store = build_store(root, tmp_path / 'store', num_workers=2, progress=False)
    assert store.last_build['failed'] == 0 and store.last_build['videos'] == 20
    for p in root.rglob('*.mp4'): p.write_bytes(b'')       # only the store can give frames now (names stay for the CSVs)
    run = tmp_path / 'run'
    pm.execute_notebook(str(REPO / 'nbs' / 'train.ipynb'), str(tmp_path / 'train.ipynb'), cwd=str(tmp_path),
                        parameters=dict(dataset='k400', data_root=str(root), store=str(tmp_path / 'store'), model='evl-tiny',
                                        num_classes=4, max_steps=3, batch_size=4, num_workers=0, eval_every=0,
                                        output_dir=str(run)), kernel_name='python3', progress_bar=False, log_output=False)
    rows = read_metrics(run / 'metrics.csv')
    assert [r['step'] for r in rows if r['kind'] == 'train'] == [1, 2, 3]
    assert all(r['loss'] == r['loss'] and r['loss'] > 0 for r in rows if r['kind'] == 'train')
    res = json.loads((run / 'results.json').read_text())
    assert res['num_samples'] == 8
    pm.execute_notebook(str(REPO / 'nbs' / 'evaluate.ipynb'), str(tmp_path / 'eval.ipynb'), cwd=str(tmp_path),
                        parameters=dict(checkpoint=str(run / 'checkpoints' / 'best.pt'), dataset='k400', data_root=str(root),
                                        store=str(tmp_path / 'store'), eval_views='1x1', num_workers=0,
                                        output_json=str(tmp_path / 'eval.json')),
                        kernel_name='python3', progress_bar=False, log_output=False)
    assert json.loads((tmp_path / 'eval.json').read_text())['num_samples'] == 8


# --- per-frame CRC32 in index.json: corrupt frames are caught and named, older stores still read ------------

@pytest.fixture(scope='module')
def small_store_src(tmp_path_factory):
    "A store of two real clips (carphone: 120 frames at 176x144; bikes), built once; tests corrupt copies."
    vids, d = fixture_path('videos'), tmp_path_factory.mktemp('crc')
    src = d / 'src'; src.mkdir()
    for name, f in (('good.mp4', 'carphone_pristine.mp4'), ('other.mp4', 'bikes.mp4')):
        (src / name).write_bytes((vids / f).read_bytes())
    store = build_store(src, d / 'store', num_workers=1, progress=False)
    assert store.last_build['failed'] == 0
    return src, d / 'store'


@pytest.fixture
def small_store(small_store_src, tmp_path):
    "A fresh copy of the small store (each test may corrupt its files)."
    src, root = small_store_src
    shutil.copytree(root, tmp_path / 'store')
    return src, ClipStore(tmp_path / 'store')


def flip_bit(tar, frame, bit=0x10):
    "Flip one bit in the middle of frame `frame`'s JPEG payload, in place (same size)."
    idx = read_index(tar); pos = int(idx['offsets'][frame]) + int(idx['sizes'][frame]) // 2
    with open(tar, 'r+b') as f:
        f.seek(pos); b = f.read(1)[0]; f.seek(pos); f.write(bytes([b ^ bit]))


def rewrite_without_crc(tar, replace=None):
    "Write `tar` again as a store written before CRCs (no `crc32` in index.json); `replace` {frame: bytes}."
    idx = read_index(tar); n = idx['frames']
    jp = [bytes(j.numpy()) for j in read_jpegs(tar, range(n))]
    for i, b in (replace or {}).items(): jp[i] = b
    pack_frames(b''.join(jp), [len(j) for j in jp], tar, idx, crc=False)


def test_index_carries_a_crc_per_frame(small_store):
    src, store = small_store
    tar = store.file(src / 'good.mp4'); idx = read_index(tar)
    with tarfile.open(tar) as t:
        raw = json.loads(t.extractfile('index.json').read())
        jpegs = [t.extractfile(f'{i:06d}.jpg').read() for i in range(idx['frames'])]
    assert raw['crc32'] == [zlib.crc32(j) for j in jpegs]
    assert idx['frames'] == 120 and idx['crc32'] == raw['crc32']
    assert store.verify('full') == {}


def test_flipped_bit_in_a_jpeg_raises_store_error_naming_tar_and_frame(small_store):
    src, store = small_store
    p = src / 'good.mp4'; tar = store.file(p); want = read_index(tar)['crc32'][57]
    before = store.read_frames(p, [3, 57, 100])
    flip_bit(tar, 57)
    got = zlib.crc32(bytes(read_jpegs(tar, [57], check=False)[0].numpy()))
    batch = [(src / 'other.mp4', [0, 1]), (p, [100, 57])]
    for read in (lambda: store.read_frames(p, [3, 57, 100]),                 # the datasets' path
                 lambda: store.read_batch(batch, device='cpu'),             # the nvjpeg path, on the CPU here
                 lambda: verify_clip_file(tar, 'full')):
        with pytest.raises(StoreError) as e: read()
        err = e.value
        assert err.kind == 'crc mismatch' and err.frame == 57 and err.path == str(tar), str(err)
        assert str(tar) in str(err) and 'frame 57' in str(err)
        assert f'{got:#010x}' in str(err) and f'expected {want:#010x}' in str(err)
    np.testing.assert_array_equal(store.read_frames(p, [3, 100]), before[[0, 2]])    # the others still read
    assert set(store.verify('full')) == {'good.mp4'}


def test_store_written_before_crcs_still_reads(small_store):
    src, store = small_store
    p = src / 'good.mp4'; tar = store.file(p)
    before = store.read_frames(p, [0, 57, 119])
    rewrite_without_crc(tar)
    with tarfile.open(tar) as t: assert 'crc32' not in json.loads(t.extractfile('index.json').read())
    assert read_index(tar)['crc32'] is None
    np.testing.assert_array_equal(store.read_frames(p, [0, 57, 119]), before)
    assert verify_clip_file(tar, 'full')['frames'] == 120 and store.verify('full') == {}
    flip_bit(tar, 57)                                   # without CRCs nothing can tell: the check is skipped
    assert len(read_jpegs(tar, [57])[0]) == read_index(tar)['sizes'][57]


def _corrupt(tar, how, frame):
    if how == 'crc mismatch': flip_bit(tar, frame)
    elif how == 'jpeg does not decode':                 # only a file without CRCs gets this far
        rewrite_without_crc(tar, {frame: bytes(int(read_index(tar)['sizes'][frame]))})
    elif how == 'truncated tar': os.truncate(tar, tar.stat().st_size // 2)
    elif how == 'index.json does not parse':
        with open(tar, 'r+b') as f: f.seek(512); f.write(b'!')


@pytest.mark.parametrize('how', ['crc mismatch', 'jpeg does not decode', 'truncated tar',
                                 'index.json does not parse'])
def test_dataset_records_the_precise_reason_of_a_corrupt_store_file(small_store, tmp_path, how):
    "The skip reason says what is wrong with the store file (not 'RuntimeError' or 'store')."
    from evl_nb.data import build_dataset, build_loader
    src, store = small_store
    lst = tmp_path / 'list.txt'; lst.write_text('good.mp4 0\nother.mp4 1\n')
    ds = build_dataset('list', 'test', data_root=src, ann_file=lst, num_frames=4, input_size=64, store=store)
    frame = int(ds.indices(store.info(src / 'good.mp4').frames)[0, 1])      # a frame this split reads
    tar = store.file(src / 'good.mp4'); _corrupt(tar, how, frame)
    assert how in STORE_REASONS
    with pytest.raises(StoreError) as e: store.read_frames(src / 'good.mp4', [frame])
    assert e.value.kind == how and str(tar) in str(e.value)
    if how in ('crc mismatch', 'jpeg does not decode'): assert e.value.frame == frame
    batch = next(iter(build_loader(ds, batch_size=2, shuffle=False)))
    assert batch['video'].shape == (1, 3, 4, 64, 64)
    [skip] = batch['skipped']
    assert (Path(skip['path']).name, skip['reason']) == ('good.mp4', how)
    assert str(tar) in skip['message']
    if how in ('crc mismatch', 'jpeg does not decode'): assert f'frame {frame}' in skip['message']
    assert ds.skip_summary()['by_reason'] == {how: 1}
