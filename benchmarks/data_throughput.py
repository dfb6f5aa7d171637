"""Clips per second per worker for three ways of reading a training clip (8 frames x interval 16, random start):

- decord seek:        `decord.VideoReader(...).get_batch(indices)` (the fast path, where the seek check passes)
- sequential decode:  PyAV decodes from frame 0 up to the last index needed (the ground truth reader)
- full decode:        PyAV decodes every frame to RGB, then indexes (what the official EVL loader does)

on the real clips in shared/fixtures/videos and on copies re-encoded to short side 320 with a key frame every
16 frames. One process, one decoding thread: the numbers are per DataLoader worker.

    python benchmarks/data_throughput.py [--repeats 5] [--videos DIR] [--short-side 320] [--keyint 16]
"""
import argparse, os, platform, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import av
import numpy as np

from evl_nb.core import find_fixture
from evl_nb.data import dense_indices
from evl_nb.video import check_video, read_frames_decord, read_frames_pyav, reencode_video, VIDEO_EXTS


def full_decode(path, indices):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    return np.stack([frames[i] for i in indices])


READERS = {'decord seek': read_frames_decord, 'sequential': read_frames_pyav, 'full decode': full_decode}


def clips_per_second(fn, path, n, repeats, seed=0):
    rng = np.random.default_rng(seed)
    draws = [dense_indices(n, 8, 16, 1, False, rng)[0].tolist() for _ in range(repeats)]
    fn(path, draws[0])                                            # warm the page cache
    t0 = time.perf_counter()
    for idx in draws: fn(path, idx)
    return repeats / (time.perf_counter() - t0)


def cpu_name():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--videos', default=None, help='folder of videos (default: shared/fixtures/videos)')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--short-side', type=int, default=320)
    ap.add_argument('--keyint', type=int, default=16)
    a = ap.parse_args()
    vdir = Path(a.videos) if a.videos else find_fixture('videos', required=True)
    paths = sorted(p for p in vdir.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in paths:
            re = reencode_video(p, Path(tmp) / (p.stem + '.mp4'), short_side=a.short_side, keyint=a.keyint)
            for label, q in ((p.name, p), (f'  re-encoded {a.short_side}p g{a.keyint}', re)):
                info = check_video(q)
                r = [label, f'{info.codec} {info.width}x{info.height}', info.frames, info.backend]
                r += [clips_per_second(fn, q, info.frames, a.repeats) for fn in READERS.values()]
                rows.append(r); print('.', end='', flush=True)
    print()
    print(f'machine: {cpu_name()}, {os.cpu_count()} cores visible, Python {platform.python_version()}, '
          f'PyAV {av.__version__}; one process, 8x16 clips, {a.repeats} clips per cell')
    head = ['video', 'codec / size', 'frames', 'reader', *[f'{k} clips/s' for k in READERS]]
    print('| ' + ' | '.join(head) + ' |'); print('|' + '---|' * len(head))
    for r in rows:
        print('| ' + ' | '.join([r[0], r[1], str(r[2]), r[3]] + [f'{x:.1f}' for x in r[4:]]) + ' |')
    g = lambda k, sel: np.exp(np.mean([np.log(r[4 + k]) for r in rows if sel(r)]))
    for name, sel in (('original', lambda r: not r[0].startswith('  ')), ('re-encoded', lambda r: r[0].startswith('  '))):
        print(f'geometric mean, {name}: ' + ', '.join(f'{k} {g(i, sel):.1f}' for i, k in enumerate(READERS)) + ' clips/s')


if __name__ == '__main__':
    main()
