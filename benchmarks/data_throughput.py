"""Data throughput: clips per second PER CORE for 8x16 Kinetics training clips (uint8 out), from

- original videos, decord seek (`read_frames_decord`, the fast path where the seek check passes)
- short-GOP H.264 re-encodes (`reencode_video`, short side 320, key frame every 16), decord seek
- the clip store (`evl_nb.store`, JPEG frames in one tar per video), libjpeg-turbo on CPU
- the clip store decoded on the GPU (nvjpeg, one batched call per batch of clips) when CUDA is present

each as decode only, decode + RandomResizedCrop to 224 (the official train crop, one draw per clip), and
decode + RandAugment rand-m7-n4-mstd0.5-inc1 + RandomResizedCrop (the full official train transform; the
transforms are evl_nb.data's, taken from a training VideoClipDataset). One process, one thread: the numbers
are per core (one DataLoader worker). Every repeat walks all videos and all readers in turn (interleaved), so
the noise of a shared machine hits every column alike; each cell is the median over the repeats.

Also: bytes per clip, cores needed per 1,000 clips/s, DataLoader clips/s with 1 and 2 workers (store vs
decord seek on the originals), conversion cost, and the disk/time estimates for converting K400 and SSv2.

The augmentation split (`augment_on`, evl_nb.augment), interleaved in one run, written with `--json OUT`:
store_worker_pil (clips/s per core of the training item with PIL RandAugment + crop in the worker),
store_worker_device (the worker's share with augment_on='device': decode + draws), device_augment_cpu (the device
share on CPU tensors, batch 32, one thread), device_augment_cuda (the same on CUDA, only with a GPU), and
dataloader_2_workers_{device,pil} (clips/s from a DataLoader with 2 workers; the device share applied in the main
process with --main-threads threads). `--augment-only` measures just these.

    nice python benchmarks/data_throughput.py [--repeats 12] [--videos DIR] [--short-side 320] [--keyint 16]
                                              [--legacy]   # also the sequential / full-decode readers
                                              [--json OUT] [--augment-only] [--main-threads 2]
                                              [--markdown docs/benchmarks.md]  # the augmentation split's section
    python benchmarks/data_throughput.py --from-json OUT --markdown docs/benchmarks.md  # render OUT again
"""
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
os.environ.setdefault('OMP_NUM_THREADS', '1')

import av
import numpy as np
import torch

torch.set_num_threads(1)

from evl_nb.augment import batch_clips
from evl_nb.core import find_fixture
from evl_nb.transforms import dense_indices
from evl_nb.data import build_dataset, collate_clips, VideoClipDataset
from evl_nb.store import build_store, read_jpegs, decode_frames
from evl_nb.video import check_video, read_frames_decord, read_frames_pyav, reencode_video, VIDEO_EXTS
sys.path.insert(0, str(Path(__file__).resolve().parent))        # bench_markdown, beside this script
from bench_markdown import load, provenance, replace_section, stamp, table

RA = 'rand-m7-n4-mstd0.5-inc1'
K400 = dict(videos=240_000, seconds=10, fps=30, height=320, width=568)    # 16:9 sources resized to short side 320
SSV2 = dict(videos=220_000, seconds=4, fps=12, height=240, width=427)     # 240p webm: kept as is (no upscaling)


def full_decode(path, indices):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    return np.stack([frames[i] for i in indices])


def cpu_name():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def transforms():
    "evl_nb.data's training transforms: crop only, and RandAugment + crop (one draw per clip)."
    crop = VideoClipDataset.from_settings([], ['x'], train=True, rand_augment=None, input_size=224)
    full = VideoClipDataset.from_settings([], ['x'], train=True, rand_augment=RA, input_size=224)
    return {'': None, '+crop': crop, '+RA+crop': full}


def as_tchw(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x).permute(0, 3, 1, 2)


def gmean(xs):
    xs = [x for x in xs if x and np.isfinite(x)]
    return float(np.exp(np.mean(np.log(xs)))) if xs else float('nan')


class ClipSet(torch.utils.data.Dataset):
    "Random 8x16 training clips from a list of videos, read with `read(path, indices)`, then the train transform."
    def __init__(self, items, read, tf, n):
        self.items, self.read, self.tf, self.n = items, read, tf, n
    def __len__(self): return self.n
    def __getitem__(self, i):
        path, frames = self.items[i % len(self.items)]
        idx = dense_indices(frames, 8, 16, 1, False, np.random.default_rng(i))[0].tolist()
        clip = as_tchw(self.read(path, idx))
        return self.tf.transform(clip, 0)[0][0].as_subclass(torch.Tensor)


def loader_rate(ds, workers, batch=8):
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, worker_init_fn=lambda _: torch.set_num_threads(1))
    t0, n = time.perf_counter(), 0                                  # worker start-up included (fork: ~0.1 s)
    for b in dl: n += b.shape[0]
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--videos', default=None, help='folder of videos (default: shared/fixtures/videos)')
    ap.add_argument('--repeats', type=int, default=12)
    ap.add_argument('--short-side', type=int, default=320)
    ap.add_argument('--keyint', type=int, default=16)
    ap.add_argument('--loader-clips', type=int, default=64, help='clips per DataLoader measurement')
    ap.add_argument('--legacy', action='store_true', help='also time the sequential and full-decode readers')
    ap.add_argument('--json', default=None, help='write the augmentation-split rates (and the machine) here')
    ap.add_argument('--augment-only', action='store_true', help='measure only the augmentation split')
    ap.add_argument('--main-threads', type=int, default=2, help="main process threads in the DataLoader runs")
    ap.add_argument('--markdown', default=None, help="replace the augmentation split's section of this file")
    ap.add_argument('--section', default='augment-split', help='the section --markdown replaces')
    ap.add_argument('--from-json', default=None, help='measure nothing: render this earlier --json output')
    a = ap.parse_args()
    if a.from_json:
        if not a.markdown: ap.error('--from-json needs --markdown FILE')
        replace_section(a.markdown, a.section, augment_split_markdown(load(a.from_json))); return
    vdir = Path(a.videos) if a.videos else find_fixture('videos', required=True)
    paths = sorted(p for p in vdir.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    tmp = tempfile.TemporaryDirectory(); tdir = Path(tmp.name)
    if a.augment_only or a.json or a.markdown:
        sdir = tdir / 'astore'
        build_store(paths, sdir, short_side=a.short_side, num_workers=1, progress=False)
        res = augment_split_rates(sdir, paths, tdir, a.repeats, a.loader_clips, a.main_threads)
        machine = f'{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}'
        res.update(provenance('data_throughput', machine))
        if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
        if a.markdown: replace_section(a.markdown, a.section, augment_split_markdown(res))
        if a.augment_only: tmp.cleanup(); return
    # conversions, one core each (timed): short-GOP re-encode and the store
    reenc, t_re = {}, {}
    for p in paths:
        t0 = time.perf_counter(); reenc[p] = reencode_video(p, tdir / 're' / (p.stem + '.mp4'), a.short_side, a.keyint)
        t_re[p] = time.perf_counter() - t0
    store = build_store(paths, tdir / 'store', short_side=a.short_side, num_workers=1, progress=False)
    infos = {p: check_video(p) for p in paths}
    srow = {p: store.rows[store.key(p)] for p in paths}
    readers = {'decord orig': lambda p, i: read_frames_decord(p, i),
               'decord g16': lambda p, i: read_frames_decord(reenc[p], i),
               'store cpu': lambda p, i: store.read_tensor(p, i)}
    if a.legacy:
        readers['sequential orig'] = read_frames_pyav
        readers['full decode orig'] = full_decode
    tfs = transforms()
    cells = {(p, r, t): [] for p in paths for r in readers for t in tfs}
    tf_only = {t: [] for t in tfs if t}
    rng = np.random.default_rng(0)
    for p in paths:                                                 # warm page cache, decoders and caches
        for r in readers.values(): r(p, dense_indices(infos[p].frames, 8, 16, 1, False, rng)[0].tolist())
    for rep in range(a.repeats):
        for p in paths:
            idx = dense_indices(infos[p].frames, 8, 16, 1, False, rng)[0].tolist()
            for rname, read in readers.items():
                for tname, ds in tfs.items():
                    torch.manual_seed(rep)
                    t0 = time.perf_counter()
                    clip = as_tchw(read(p, idx))
                    if ds is not None: ds.transform(clip, 0)
                    cells[(p, rname, tname)].append(time.perf_counter() - t0)
            clip = store.read_tensor(p, idx)
            for tname, ds in tfs.items():
                if ds is None: continue
                torch.manual_seed(rep); t0 = time.perf_counter(); ds.transform(clip, 0); tf_only[tname].append(time.perf_counter() - t0)
        print('.', end='', flush=True)
    print()
    rate = {k: 1 / np.median(v) for k, v in cells.items()}
    gpu = None
    if torch.cuda.is_available():
        gpu = gpu_rates(store, paths, infos, a.repeats)
    # ---------------------------------------------------------------- report
    print(f'machine: {cpu_name()}, {os.cpu_count()} cores visible (shared), Python {platform.python_version()}, '
          f'torch {torch.__version__}, PyAV {av.__version__}; one process, one thread, 8x16 clips, '
          f'median of {a.repeats} interleaved repeats' + (f', GPU {torch.cuda.get_device_name()}' if gpu else ''))
    cols = [(r, t) for r in readers for t in tfs]
    head = ['video', 'source', 'frames', 'store frame', 'KB/frame', *[f'{r}{t}' for r, t in cols]]
    print('| ' + ' | '.join(head) + ' |'); print('|' + '---|' * len(head))
    for p in paths:
        i, s = infos[p], srow[p]
        kb = int(s['bytes']) / int(s['frames']) / 1e3
        print('| ' + ' | '.join([p.name, f'{i.codec} {i.width}x{i.height}', str(i.frames), f"{s['width']}x{s['height']}",
                                 f'{kb:.0f}'] + [f'{rate[(p, r, t)]:.1f}' for r, t in cols]) + ' |')
    g = {c: gmean([rate[(p, *c)] for p in paths]) for c in cols}
    print('| **geometric mean** | | | | | ' + ' | '.join(f'**{g[c]:.1f}**' for c in cols) + ' |')
    print()
    base = g[('decord orig', '')]
    print(f"store decode+crop+resize vs decord seek (decode only) on the originals: {g[('store cpu', '+crop')] / base:.1f}x "
          f"(acceptance >= 5x); like for like (both +crop): {g[('store cpu', '+crop')] / g[('decord orig', '+crop')]:.1f}x; "
          f"decode only: {g[('store cpu', '')] / base:.1f}x")
    for t, v in tf_only.items():
        print(f'train transform alone ({t[1:]}) on store frames: {1e3 * np.median(v):.1f} ms per clip '
              f'({1 / np.median(v):.0f} clips/s per core)')
    print('cores per 1,000 clips/s: ' + ', '.join(f'{r}{t} {1000 / g[(r, t)]:.0f}' for r, t in cols if r in
                                                   ('decord orig', 'decord g16', 'store cpu')))
    if gpu: print(gpu)
    # bytes
    jb = [int(s['bytes']) / int(s['frames']) for s in srow.values()]
    px = [int(s['width']) * int(s['height']) for s in srow.values()]
    bpp = float(np.mean([b / q for b, q in zip(jb, px)]))
    print(f"bytes per clip (8 frames): store {8 * np.mean(jb) / 1e3:.0f} KB read (JPEG, {bpp:.3f} B/pixel); "
          f"original files {np.mean([p.stat().st_size for p in paths]) / 1e3:.0f} KB and g16 "
          f"{np.mean([q.stat().st_size for q in reenc.values()]) / 1e3:.0f} KB per video "
          f"(a seek reads and decodes from the previous key frame)")
    print(f"disk per video: store / original = {np.mean([int(srow[p]['bytes']) / p.stat().st_size for p in paths]):.1f}x, "
          f"store / g16 = {np.mean([int(srow[p]['bytes']) / reenc[p].stat().st_size for p in paths]):.1f}x")
    # DataLoader
    items = [(p, infos[p].frames) for p in paths]
    for name, read in (('store cpu', lambda p, i: store.read_tensor(p, i)), ('decord orig', read_frames_decord)):
        for tname in ('+crop', '+RA+crop'):
            r = [loader_rate(ClipSet(items, read, tfs[tname], a.loader_clips), w) for w in (1, 2)]
            print(f'DataLoader {name}{tname}: 1 worker {r[0]:.1f} clips/s, 2 workers {r[1]:.1f} clips/s')
    # conversion cost and estimates
    fr = sum(int(srow[p]['frames']) for p in paths)
    conv = sum(float(srow[p]['seconds']) for p in paths)
    fps_conv, fps_re = fr / conv, fr / sum(t_re.values())
    print(f'conversion, one core: store {fps_conv:.0f} frames/s, short-GOP re-encode {fps_re:.0f} frames/s '
          f'(fixture sources {min(i.height for i in infos.values())}p-{max(i.height for i in infos.values())}p)')
    q = quality_ratios(store, paths, infos)
    for name, d in (('K400', K400), ('SSv2', SSV2)):
        frames = d['videos'] * d['seconds'] * d['fps']
        disk = frames * d['height'] * d['width'] * bpp
        alt = ', '.join(f'{k} {disk * v / 1e12:.2f} TB' for k, v in q.items())
        if name == 'K400': alt += f", short side 256 q95 {disk * (256 / 320) ** 2 / 1e12:.2f} TB"
        print(f"{name}: {d['videos']:,} videos x {d['seconds']} s x {d['fps']} fps = {frames / 1e6:.0f}M frames at "
              f"{d['width']}x{d['height']}: store (q95) {disk / 1e12:.2f} TB ({alt}); conversion on 16 cores ~"
              f"{frames / fps_conv / 16 / 3600:.1f} h (re-encode ~{frames / fps_re / 16 / 3600:.1f} h)")
    tmp.cleanup()


class Seeded(torch.utils.data.Dataset):
    "Item k of a dataset, `n` items in all, drawn with torch seeded by k (the same clip whichever path reads it)."
    def __init__(self, ds, n): self.ds, self.n = ds, n
    def __len__(self): return self.n
    def __getitem__(self, k):
        torch.manual_seed(k)
        return self.ds[k % len(self.ds)]


def augment_split_rates(store_dir, paths, tdir, repeats, loader_clips, main_threads, batch=32):
    "The augment_on rates (see the module doc), PIL and device interleaved in every repeat."
    lst = tdir / 'aug_list.txt'
    lst.write_text(''.join(f'{p} 0\n' for p in paths))
    mk = lambda on: build_dataset('list', 'train', ann_file=lst, store=store_dir, num_frames=8, frame_interval=16,
                                  sampling='dense', rand_augment=RA, input_size=224, augment_on=on)
    sets = {'pil': mk('worker'), 'device': mk('device')}
    n = len(paths)
    item = {k: [] for k in sets}
    for ds in sets.values(): Seeded(ds, n)[0]                                  # warm up
    for rep in range(repeats):
        for k in range(n):
            for name, ds in sets.items():
                s = Seeded(ds, 10 ** 6)
                t0 = time.perf_counter(); s[rep * n + k]; item[name].append(time.perf_counter() - t0)
    res = {'store_worker_pil': n * repeats / sum(item['pil']), 'store_worker_device': n * repeats / sum(item['device'])}
    dev = Seeded(sets['device'], batch)
    b = collate_clips([dev[k] for k in range(batch)])
    batch_clips(b)
    tc = []
    for _ in range(max(3, repeats // 3)):
        t0 = time.perf_counter(); batch_clips(b); tc.append(time.perf_counter() - t0)
    res['device_augment_cpu'] = batch / float(np.median(tc))
    if torch.cuda.is_available():
        batch_clips(b, 'cuda'); torch.cuda.synchronize(); tg = []
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter(); batch_clips(b, 'cuda'); torch.cuda.synchronize(); tg.append(time.perf_counter() - t0)
        res['device_augment_cuda'] = batch / float(np.median(tg))
    dl = {k: [] for k in sets}
    for _ in range(2):                                                       # interleaved: pil, device, pil, device
        for name, ds in sets.items():
            dl[name].append(loader_aug_rate(Seeded(ds, loader_clips), name == 'device', main_threads))
    res['dataloader_2_workers_pil'] = float(np.mean(dl['pil']))
    res['dataloader_2_workers_device'] = float(np.mean(dl['device']))
    res = {k: round(v, 2) for k, v in res.items()}
    combined = 1 / (1 / res['store_worker_device'] + 1 / res['device_augment_cpu'])
    print(f"augment_on split ({RA}, store at short side, 8x16 clips, crop 224): worker PIL {res['store_worker_pil']:.1f}"
          f" clips/s per core, worker share with augment_on='device' {res['store_worker_device']:.1f} "
          f"({res['store_worker_device'] / res['store_worker_pil']:.1f}x); device share on CPU (batch {batch}, 1 thread) "
          f"{res['device_augment_cpu']:.1f} clips/s; both on one core {combined:.1f} "
          f"({combined / res['store_worker_pil']:.2f}x PIL)"
          + (f"; device share on CUDA {res['device_augment_cuda']:.0f} clips/s" if 'device_augment_cuda' in res else ''))
    print(f"DataLoader, 2 workers: augment_on='device' {res['dataloader_2_workers_device']:.1f} clips/s (device share "
          f"in the main process, {main_threads} threads), 'worker' {res['dataloader_2_workers_pil']:.1f} clips/s "
          f"({res['dataloader_2_workers_device'] / res['dataloader_2_workers_pil']:.2f}x)")
    res['main_threads'] = main_threads
    return res


SPLIT_ROWS = [('store_worker_pil', 'worker, store + PIL RandAugment + crop, per core'),
              ('store_worker_device', "worker share with `augment_on='device'` (store + draws), per core"),
              ('device_augment_cpu', 'device share on CPU tensors, batch 32, one thread'),
              ('device_augment_cuda', 'device share on CUDA, batch 32'),
              ('dataloader_2_workers_pil', "DataLoader, 2 workers, `augment_on='worker'`"),
              ('dataloader_2_workers_device', 'DataLoader, 2 workers, device share in the main process')]


def augment_split_markdown(res) -> str:
    "The augmentation split as a markdown section: the stamp and one row per rate (ratios against the PIL path)."
    ratio = {'store_worker_device': 'store_worker_pil', 'dataloader_2_workers_device': 'dataloader_2_workers_pil'}
    rows = []
    for key, what in SPLIT_ROWS:
        v = res.get(key)
        cell = 'not measured' if v is None else f'{v:.1f}'
        if v is not None and res.get(ratio.get(key)): cell += f' ({v / res[ratio[key]]:.2f}x)'
        if key == 'dataloader_2_workers_device' and res.get('main_threads'): what += f" ({res['main_threads']} threads)"
        rows.append((f'`{key}`: {what}', cell))
    if res.get('store_worker_device') and res.get('device_augment_cpu'):
        both = 1 / (1 / res['store_worker_device'] + 1 / res['device_augment_cpu'])
        rows.insert(3, ('both shares on one core', f"{both:.1f} ({both / res['store_worker_pil']:.2f}x)"))
    return stamp(res) + '\n\n' + table(('measurement', 'clips/s'), rows)


def loader_aug_rate(ds, device_share, main_threads, batch=8):
    was = torch.get_num_threads()
    torch.set_num_threads(main_threads)
    try:
        dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=2, collate_fn=collate_clips,
                                         worker_init_fn=lambda _: torch.set_num_threads(1), prefetch_factor=4)
        t0, n = time.perf_counter(), 0
        for b in dl:
            v = batch_clips(b) if device_share else b['video']
            n += v.shape[0]
        return n / (time.perf_counter() - t0)
    finally: torch.set_num_threads(was)


def quality_ratios(store, paths, infos, every=25):
    "JPEG bytes at other qualities relative to the store's quality 95, from re-encoding stored frames."
    from torchvision.io import encode_jpeg
    fr = [store.read_tensor(p, list(range(0, infos[p].frames, every))) for p in paths]
    size = lambda q: sum(len(j) for f in fr for j in encode_jpeg(list(f), quality=q))
    base = size(95)
    return {f'q{q}': size(q) / base for q in (90, 85)}


def gpu_rates(store, paths, infos, repeats, batch=32):
    "Store clips/s decoded on the GPU: one nvjpeg call per batch of `batch` clips (+ the crop on the GPU)."
    from torchvision.transforms import v2
    crop = v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True)
    rng = np.random.default_rng(1)
    def one():
        items = []
        for k in range(batch):
            p = paths[k % len(paths)]
            items.append((p, dense_indices(infos[p].frames, 8, 16, 1, False, rng)[0].tolist()))
        return store.read_batch(items, device='cuda')
    one(); torch.cuda.synchronize()
    full = transforms()['+RA+crop']
    ts, tc, tr = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); clips = one(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); [crop(c) for c in clips]; torch.cuda.synchronize(); tc.append(time.perf_counter() - t0)
        try:
            t0 = time.perf_counter(); [full.transform(c, 0) for c in clips]; torch.cuda.synchronize()
            tr.append(time.perf_counter() - t0)
        except Exception as err: tr = [f'{type(err).__name__}: {err}']
    ra = (f'{batch / (np.median(ts) + np.median(tr)):.0f} clips/s' if tr and not isinstance(tr[0], str) else
          f'failed ({tr[0] if tr else "not run"})')
    return (f'store on GPU (nvjpeg, {batch} clips per call, one CPU thread): decode {batch / np.median(ts):.0f} clips/s, '
            f'decode + crop on GPU {batch / (np.median(ts) + np.median(tc)):.0f} clips/s, '
            f'decode + RA + crop on GPU (one draw per clip) {ra}')


if __name__ == '__main__':
    main()
