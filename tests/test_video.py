"""Decoding: decord's fast path must give exactly the frames of a sequential PyAV decode; broken files get typed errors."""
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import fixture_path
from evl_nb.transforms import dense_indices, uniform_indices
from evl_nb.data import build_dataset
from evl_nb.synthetic import render_clip, write_video, make_synthetic_dataset
from evl_nb.video import (check_video, count_frames, read_clip, read_frames_pyav, read_frames_decord, open_video,
                          scan_videos, load_manifest, reencode_video, EmptyVideoError, UnreadableVideoError,
                          TruncatedVideoError, NoVideoStreamError, MissingVideoError)

FIXTURE_CLIPS = {  # name: frames from a full sequential decode (fixtures README)
    'bikes.mp4': 250, 'carphone_pristine.mp4': 120, 'balle-jbart.mp4': 255,
    'mmaction2_demo_armwrestling_k400.mp4': 280, 'mmaction2_test_cleaningpool.mp4': 300,
    'mmaction2_test_eyemakeup.avi': 164, 'mmaction2_basketball.mp4': 300,
}


def sampling_table(n, seed=0):
    "Train and test indices as the datasets draw them: dense 8x16 and 8x4 (1 and 3 views), uniform 8 (1 and 2 views)."
    rng = np.random.default_rng(seed)
    out = []
    for test in (False, True):
        out.append(dense_indices(n, 8, 16, 1, test, rng))
        out.append(dense_indices(n, 8, 4, 1 if not test else 3, test, rng))
        out.append(uniform_indices(n, 8, 1 if not test else 2, test, rng))
    return out


def assert_frames_match_sequential(path, n_expected=None, info=None):
    info = info or check_video(path)
    assert info.ok, info.message
    if n_expected is not None: assert info.frames == n_expected
    table = [inds.reshape(-1).tolist() for inds in sampling_table(info.frames)]
    union = sorted(set(sum(table, [])))
    truth = dict(zip(union, read_frames_pyav(path, union)))     # one sequential decode for all patterns
    for flat in table:
        np.testing.assert_array_equal(read_clip(path, flat, info), np.stack([truth[i] for i in flat]), err_msg=f'{path} {flat}')
    return info


@pytest.mark.parametrize('name', sorted(FIXTURE_CLIPS))
def test_fixture_clips_match_sequential_decode(name, checked_clips):
    path = fixture_path('videos', name)
    info = assert_frames_match_sequential(path, FIXTURE_CLIPS[name], checked_clips.of(path))   # check_video(path)
    assert info.backend in ('decord', 'pyav')


def test_fixture_clips_through_dataset_match_sequential(tmp_path):
    "Items of a dataset (train and multi-view test) carry exactly the frames of a sequential decode."
    vids = fixture_path('videos')
    lst = tmp_path / 'list.txt'
    names = ['carphone_pristine.mp4', 'mmaction2_demo_armwrestling_k400.mp4', 'mmaction2_test_eyemakeup.avi']  # every clip: above
    lst.write_text(''.join(f'{vids / n} {i}\n' for i, n in enumerate(names)))
    tr = build_dataset('list', 'train', ann_file=lst, num_frames=8, frame_interval=4)
    te = build_dataset('list', 'test', ann_file=lst, num_frames=8, frame_interval=16, views='3x1')
    te.infos = tr.infos                       # check each file once
    for i in range(len(tr)):
        (ia, fa), (ib, fb) = tr.read_frames(i), te.read_frames(i)
        ia, ib = ia.reshape(-1).tolist(), ib.reshape(-1).tolist()
        union = sorted(set(ia + ib))
        truth = dict(zip(union, read_frames_pyav(tr.samples[i][0], union)))
        np.testing.assert_array_equal(fa, np.stack([truth[j] for j in ia]))
        np.testing.assert_array_equal(fb, np.stack([truth[j] for j in ib]))


def test_xvid_avi_is_read_sequentially():
    "MPEG-4 part 2 in AVI is a format where decord's seek goes wrong intermittently: it is never trusted by default."
    avi = fixture_path('videos', 'mmaction2_test_eyemakeup.avi')
    info = check_video(avi)
    assert info.opens and not info.seek_ok and info.backend == 'pyav', info
    assert info.codec == 'mpeg4' and info.frames == 164
    np.testing.assert_array_equal(read_clip(avi, [163, 3, 163], info), read_frames_pyav(avi, [163, 3, 163]))


class _WrongSeekReader:
    "A decord stand-in whose seek returns the next frame for one index, as decord does on bad files."
    def __init__(self, real, wrong_at):
        self.real, self.wrong_at = real, wrong_at
    def __len__(self): return len(self.real)
    def get_batch(self, idx):
        idx = [i + 1 if i == self.wrong_at else i for i in idx]
        return self.real.get_batch(idx)


def test_seek_check_detects_wrong_frames(monkeypatch):
    "The check compares decord with the sequential decode frame by frame and rejects a file on any mismatch."
    import evl_nb.video as V
    path = fixture_path('videos', 'carphone_pristine.mp4')
    assert check_video(path).seek_ok
    real = V.decord_reader
    for wrong_at in (0, 60, 118):
        monkeypatch.setattr(V, 'decord_reader', lambda p, t=1, w=wrong_at: _WrongSeekReader(real(p, t), w))
        info = check_video(path, num_probes=12)
        if wrong_at in V._probe_indices(120, 12, __import__('random').Random(0)):
            assert not info.seek_ok and 'wrong frames' in info.message and info.backend == 'pyav', info


def test_h264_fixture_uses_decord():
    info = check_video(fixture_path('videos', 'bikes.mp4'))
    assert info.seek_ok and info.backend == 'decord' and info.codec == 'h264' and (info.width, info.height) == (640, 272)


@pytest.mark.parametrize('ext', ['mp4', 'webm'])
def test_generated_files_match_sequential_decode(tmp_path, ext):
    frames, _ = render_clip(3, num_frames=40, height=96, width=128, rng=1)
    p = write_video(tmp_path / f'clip.{ext}', frames, keyint=12)
    info = assert_frames_match_sequential(p, 40)
    assert info.codec == {'mp4': 'h264', 'webm': 'vp9'}[ext]


def test_frame_count_comes_from_decoding(tmp_path):
    "WebM stores no frame count (the container 'says' 0): the count comes from decoding."
    frames, _ = render_clip(0, num_frames=23, height=64, width=64, rng=0)
    p = write_video(tmp_path / 'x.webm', frames)
    info = check_video(p)
    assert info.claimed_frames != 23 and info.frames == 23 == count_frames(p)


def make_broken_files(d: Path, good_clip: Path | None = None) -> dict:
    "Broken files of every kind; returns {path: expected error kind}."
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    (d / 'zero_bytes.mp4').touch(); out[d / 'zero_bytes.mp4'] = 'empty'
    (d / 'not_a_video.mp4').write_text('<html><body>404 Not Found</body></html>\n' * 20); out[d / 'not_a_video.mp4'] = 'unreadable'
    if good_clip is None:
        frames, _ = render_clip(0, 48, 64, 80, rng=0); good_clip = write_video(d / '_src.mp4', frames)
    data = Path(good_clip).read_bytes()
    (d / 'truncated.mp4').write_bytes(data[: len(data) // 2]); out[d / 'truncated.mp4'] = 'truncated'
    c = av.open(str(d / 'audio_only.m4a'), 'w'); s = c.add_stream('aac', rate=16000)
    for i in range(10):
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='fltp', layout='mono')
        fr.sample_rate, fr.pts = 16000, i * 1024
        for p in s.encode(fr): c.mux(p)
    for p in s.encode(): c.mux(p)
    c.close(); out[d / 'audio_only.m4a'] = 'no_video_stream'
    if (d / '_src.mp4').exists(): (d / '_src.mp4').unlink()
    return out


def test_broken_files_get_typed_errors(tmp_path):
    broken = make_broken_files(tmp_path)
    for p, kind in broken.items():
        info = check_video(p)
        assert info.error == kind and str(p) in info.message, (p, info)
        with pytest.raises(Exception) as e: read_clip(p, [0], info)
        assert getattr(e.value, 'kind', None) == kind and str(p) in str(e.value)
    with pytest.raises(EmptyVideoError): open_video(tmp_path / 'zero_bytes.mp4')
    with pytest.raises(UnreadableVideoError): open_video(tmp_path / 'not_a_video.mp4')
    with pytest.raises(TruncatedVideoError): open_video(tmp_path / 'truncated.mp4')
    with pytest.raises(NoVideoStreamError): open_video(tmp_path / 'audio_only.m4a')
    with pytest.raises(MissingVideoError): open_video(tmp_path / 'nope.mp4')


def test_truncated_faststart_mp4(tmp_path):
    "An mp4 whose index is intact but whose data is cut off decodes part way, then fails: truncated."
    frames, _ = render_clip(0, 60, 64, 80, rng=0)
    src = tmp_path / 'fs.mp4'
    c = av.open(str(src), 'w', options={'movflags': 'faststart'})
    s = c.add_stream('libx264', rate=12); s.width, s.height, s.pix_fmt = 80, 64, 'yuv420p'
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format='rgb24'); vf.pts = i
        for p in s.encode(vf): c.mux(p)
    for p in s.encode(): c.mux(p)
    c.close()
    data = src.read_bytes(); cut = tmp_path / 'cut.mp4'; cut.write_bytes(data[: int(len(data) * 0.6)])
    assert check_video(cut).error == 'truncated'


def test_scanner_writes_manifest_with_workers(tmp_path):
    vids = fixture_path('videos')
    broken = make_broken_files(tmp_path / 'broken')
    paths = [vids / 'carphone_pristine.mp4', vids / 'mmaction2_test_eyemakeup.avi', *broken]
    infos = scan_videos(paths, manifest=tmp_path / 'm.csv', num_workers=2, progress=False)
    m = load_manifest(tmp_path / 'm.csv')
    assert len(m) == len(paths) == len(infos)
    by_name = {Path(k).name: v for k, v in m.items()}
    assert (by_name['carphone_pristine.mp4'].frames, by_name['carphone_pristine.mp4'].seek_ok) == (120, True)
    assert (by_name['mmaction2_test_eyemakeup.avi'].frames, by_name['mmaction2_test_eyemakeup.avi'].seek_ok) == (164, False)
    assert by_name['carphone_pristine.mp4'].fps == pytest.approx(29.97, abs=0.01)
    for p, kind in broken.items(): assert by_name[p.name].error == kind


def test_reencode_short_side_and_keyframes(tmp_path):
    src = fixture_path('videos', 'carphone_pristine.mp4')
    out = reencode_video(src, tmp_path / 'c.mp4', short_side=256, keyint=8)
    info = check_video(out)
    assert (info.frames, info.height, info.width, info.codec, info.seek_ok) == (120, 256, 312, 'h264', True)
    with av.open(str(out)) as c:
        keys = [i for i, p in enumerate(c.demux(video=0)) if p.is_keyframe and p.size]
    assert max(np.diff(keys)) <= 8


def test_one_frame_mp4_loads(tmp_path, caplog):
    "A one-frame video is not broken: it loads with its frame repeated (a debug note); min_frames=2 still refuses it."
    import logging
    one, _ = render_clip(2, 1, 64, 80, rng=0)
    p = write_video(tmp_path / 'one_frame.mp4', one)
    info = check_video(p)
    assert info.ok and info.frames == 1, info
    assert check_video(p, min_frames=2).error == 'too_short'
    (tmp_path / 'l.txt').write_text(f'{p} 0\n')
    truth = read_frames_pyav(p, [0])[0]
    for split, kw in (('train', dict(sampling='dense', frame_interval=4)), ('test', dict(sampling='uniform', views='2x3')),
                      ('test', dict(sampling='dense', frame_interval=16, views='3x1'))):
        ds = build_dataset('list', split, ann_file=tmp_path / 'l.txt', num_frames=8, input_size=32, **kw)
        with caplog.at_level(logging.DEBUG, logger='evl_nb'):
            inds, frames = ds.read_frames(0)
            it = ds[0]
        assert (inds == 0).all() and all(np.array_equal(f, truth) for f in frames)
        assert 'skip' not in it and it['video'].shape[-4:] == (3, 8, 32, 32)
    notes = [r for r in caplog.records if 'one_frame.mp4' in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG and 'repeated' in notes[0].getMessage()
