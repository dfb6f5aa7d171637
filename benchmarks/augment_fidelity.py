"""Fidelity of the device augmentation (evl_nb.augment) against the PIL reference (evl_nb.data, the official path).

For each RandAugment op at magnitudes 0, 5 and 10 and both signs, on frames of every shared fixture video (full
size), the tensor op is compared with the PIL op: mean and max absolute difference in uint8 levels, the worst over
the cases. Then whole training clips: parameters drawn as training draws them (rand-m7-n4-mstd0.5-inc1, the crop,
the flip), applied once by each path: the distribution of the per-clip mean difference.

    python benchmarks/augment_fidelity.py [--json OUT] [--clips 100] [--markdown docs/benchmarks.md]
    python benchmarks/augment_fidelity.py --from-json OUT --markdown docs/benchmarks.md   # render OUT again
"""
import argparse, json, os, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import numpy as np
import torch

from evl_nb.augment import apply_clip_aug, tensor_op
from evl_nb.core import find_fixture
from evl_nb.transforms import RAND_INCREASING_OPS, rand_augment_op
from evl_nb.data import VideoClipDataset
from evl_nb.video import VIDEO_EXTS, check_video, read_frames_pyav
sys.path.insert(0, str(Path(__file__).resolve().parent))        # bench_markdown, beside this script
from bench_markdown import cpu_name, load, provenance, replace_section, stamp, table

RA = 'rand-m7-n4-mstd0.5-inc1'


def fixture_clips(vdir, frames=2):
    "A few frames `(T, 3, H, W)` of every fixture video, at their own size."
    out = {}
    for p in sorted(x for x in Path(vdir).iterdir() if x.suffix.lower() in VIDEO_EXTS):
        n = check_video(p).frames
        idx = sorted({0, max(0, n // 2)})[:frames]
        out[p.name] = torch.from_numpy(np.ascontiguousarray(read_frames_pyav(p, idx))).permute(0, 3, 1, 2).contiguous()
    return out


def diff(a, b):
    d = (a.int() - b.as_subclass(torch.Tensor).int()).abs().float()
    return d.mean().item(), d.max().item()


def per_op(clips):
    ops = {}
    for name in RAND_INCREASING_OPS:
        worst_mean, worst_max = 0.0, 0.0
        for clip in clips.values():
            for m in (0, 5, 10):
                for s in (1.0, -1.0):
                    mean, mx = diff(tensor_op(name, clip, m, s), rand_augment_op(name, clip, m, s))
                    worst_mean, worst_max = max(worst_mean, mean), max(worst_max, mx)
        ops[name] = {'mean': round(worst_mean, 4), 'max': worst_max}
    return ops


def whole_clips(clips, n):
    "n training clips with drawn parameters, through both paths: per-clip mean differences."
    ds = VideoClipDataset.from_settings([], ['x'], train=True, rand_augment=RA, input_size=224, augment_on='device')
    means, exact = [], 0
    names = list(clips)
    for k in range(n):
        clip = clips[names[k % len(names)]]
        torch.manual_seed(k)
        aug, _ = ds.draw_aug(*clip.shape[-2:], 0)
        ref = ds.crop.apply(ds.rand_augment.apply(clip, aug.ops), aug.box)
        ref = ref.flip(-1) if aug.flip else ref
        got = apply_clip_aug(clip, aug).permute(1, 0, 2, 3)
        mean, _ = diff(got, ref)
        means.append(mean); exact += mean == 0
    q = np.percentile(means, [50, 90, 99]).round(3).tolist()
    return {'clips': n, 'exact': exact, 'mean': round(float(np.mean(means)), 4), 'p50': q[0], 'p90': q[1],
            'p99': q[2], 'max': round(float(np.max(means)), 3)}


def fidelity_markdown(res) -> str:
    "The results as a markdown section: the stamp, the per-op table and the whole-clip line."
    rows = [(name, f"{r['mean']:.4f}", f"{r['max']:.0f}") for name, r in res['ops'].items()]
    c = res['clips']
    head = ('op (worst over magnitudes 0/5/10, both signs)', 'mean levels', 'max levels')
    return (stamp(res) + '\n\n' + table(head, rows)
            + f"\n\nWhole clips ({RA} + crop + flip, {c['clips']}): {c['exact']} identical; per-clip mean difference: "
            f"mean {c['mean']}, median {c['p50']}, p90 {c['p90']}, p99 {c['p99']}, max {c['max']} levels.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--json', default=None, help='write the results here')
    ap.add_argument('--videos', default=None, help='folder of videos (default: shared/fixtures/videos)')
    ap.add_argument('--clips', type=int, default=100, help='whole training clips compared')
    ap.add_argument('--markdown', default=None, help='replace the augment-fidelity section of this file')
    ap.add_argument('--section', default='augment-fidelity', help='the section --markdown replaces')
    ap.add_argument('--from-json', default=None, help='measure nothing: render this earlier --json output')
    a = ap.parse_args()
    if a.from_json:
        if not a.markdown: ap.error('--from-json needs --markdown FILE')
        replace_section(a.markdown, a.section, fidelity_markdown(load(a.from_json))); return
    clips = fixture_clips(a.videos or find_fixture('videos', required=True))
    res = {'ops': per_op(clips), 'clips': whole_clips(clips, a.clips),
           'videos': {k: list(v.shape) for k, v in clips.items()},
           **provenance('augment_fidelity', f'{cpu_name()}, {os.cpu_count()} cores, '
                                            f'torch {torch.__version__}')}
    print(f"{'op':22s} {'mean':>7s} {'max':>5s}   (uint8 levels, worst over magnitudes 0/5/10, both signs)")
    for name, r in res['ops'].items(): print(f"{name:22s} {r['mean']:7.4f} {r['max']:5.0f}")
    c = res['clips']
    print(f"whole clips ({RA} + crop + flip, {c['clips']}): {c['exact']} exact; per-clip mean difference: mean "
          f"{c['mean']}, median {c['p50']}, p90 {c['p90']}, p99 {c['p99']}, max {c['max']}")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
    if a.markdown: replace_section(a.markdown, a.section, fidelity_markdown(res))


if __name__ == '__main__':
    main()
