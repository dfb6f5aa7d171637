#!/usr/bin/env python
"""EVL model throughput and memory: the optimised path against the official code's formulation, same run.

For each model it times the training step (frozen backbone forward + decoder forward/backward + AdamW step)
and inference on synthetic clips (no decoding), reports clips/s, peak memory and, on CUDA, model FLOP
utilisation, for

- the optimised path: this workbench's model (fused SDPA, TCA summed into relative offsets, decoder cross
  attention folded onto its single query), tower in `--precision` (bf16 on CUDA) with fp32 LayerNorms,
  inference under `torch.inference_mode`, uint8 clips sent to the device and normalised there, fused
  AdamW on CUDA, optionally `torch.compile` (`--compile`);
- the plain path: `evl_nb.model.official_formulation` of the same weights (separate q/k/v projections and
  explicit softmax(QK^T)V in backbone and decoder, TCA by gathering `w[idx]`), tower in fp16 on CUDA as
  the official code runs it (fp32 on CPU, where fp16 matmuls are slow or unsupported), fp16 autocast with
  GradScaler for training on CUDA, float32 clips normalised on the host, the default (foreach) AdamW.

Timings interleave the two paths and report medians over `--repeats` (the CPU may be shared).
Then the component ablations: each optimisation measured alone, and the TCA's extra memory.

  python benchmarks/model_throughput.py --quick                      # evl-tiny on CPU, seconds
  python benchmarks/model_throughput.py --device cpu                 # evl-b16-8f, evl-l14-8f, evl-tiny
  python benchmarks/model_throughput.py --device cuda --precision bf16 --batch-size 32
  ... --json OUT --markdown docs/benchmarks.md   # also replace the section model-<device>-<precision>
  python benchmarks/model_throughput.py --from-json OUT --markdown docs/benchmarks.md   # render OUT again
"""
from __future__ import annotations
import argparse, contextlib, json, math, statistics, sys, time
from dataclasses import dataclass, field
from pathlib import Path

try: import evl_nb  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from evl_nb.model import TemporalCrossAttention, build_evl, get_config, official_formulation, tca_gather

sys.path.insert(0, str(Path(__file__).resolve().parent))        # bench_markdown, beside this script
from bench_markdown import cpu_name, load, provenance, replace_section, stamp, table

try:
    from evl_nb.transforms import normalize_clip
except ImportError:  # the data chapter is optional here: same CLIP normalisation, done where the tensor lives
    def normalize_clip(video, device=None):
        if device is not None: video = video.to(device, non_blocking=True)
        m = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=video.device).view(3, 1, 1, 1)
        s = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=video.device).view(3, 1, 1, 1)
        return (video.float() / 255 - m) / s

MODELS = ('evl-b16-8f', 'evl-l14-8f', 'evl-tiny')
# dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name substring, first match wins
PEAK_FLOPS = [('H100 PCIe', 756e12), ('H100', 989.4e12), ('H200', 989.4e12), ('GH200', 989.4e12), ('B200', 2250e12),
              ('A100', 312e12), ('L40S', 362e12), ('L40', 181e12), ('A10G', 70e12), ('A10', 125e12), ('L4', 121e12),
              ('4090', 165e12), ('V100', 125e12)]


# ----------------------------------------------------------------------------------------------- measuring
def tune_glibc_malloc() -> bool:
    """Keep freed memory in the heap (glibc: no mmap per large tensor, no trimming).

    By default glibc serves large blocks with mmap and returns them on free, so every large tensor page-faults
    afresh, and its adaptive threshold makes the cost depend on what ran before (the same step measured 0.44 s
    or 6.3 s in one process). The same setting applies to both paths."""
    import ctypes, ctypes.util
    try: libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError: return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**40))


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def cpu_peak_extra_bytes(fn) -> int:
    "Peak of bytes allocated on the CPU while `fn` runs, above what was live when it started (profiler events)."
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, n in events:
        cur += n; peak = max(peak, cur)
    return peak


def tensor_bytes(*objs) -> int:
    "Bytes of the distinct tensor storages in modules, optimisers, tensors or lists of them."
    seen, total = set(), 0
    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr()); total += t.untyped_storage().nbytes()
    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()): add(t)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for t in st.values(): add(t)
        elif isinstance(o, (list, tuple)):
            for t in o: add(t)
        else: add(o)
    return total


def peak_memory(fn, device, resident=None) -> tuple[float, str]:
    """(bytes, what) for one call of fn. CUDA: the step's peak above what was allocated before it, plus
    `resident()` (this path's own weights, buffers and optimiser state), i.e. its footprint as if it ran alone
    (both paths share the GPU in the benchmark). CPU: peak extra bytes allocated during the call."""
    if device.type == 'cuda':
        sync(device); before = torch.cuda.memory_allocated(device); torch.cuda.reset_peak_memory_stats(device)
        fn(); sync(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        return extra + (resident() if resident else 0), 'peak allocated'
    return cpu_peak_extra_bytes(fn), 'peak extra'


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def peak_flops(device, override_tflops=None):
    if override_tflops: return override_tflops * 1e12
    if device.type != 'cuda': return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def time_paths(fns: dict, device, iters: int, warmup: int, repeats: int) -> dict:
    "Median seconds per call of each fn; the fns are interleaved in every repeat so load changes hit all alike."
    for fn in fns.values():
        for _ in range(warmup): fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device); t = time.perf_counter()
            for _ in range(iters): fn()
            sync(device); times[k].append((time.perf_counter() - t) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------- the paths
@dataclass
class BenchPath:
    name: str
    model: torch.nn.Module
    autocast: torch.dtype | None      # decoder autocast dtype (None: off)
    scaler: bool                      # GradScaler (fp16 training)
    uint8_input: bool                 # send uint8, normalise on the device
    fused_adamw: bool
    inference_mode: bool
    notes: list = field(default_factory=list)


def make_paths(preset, args, device) -> tuple[BenchPath, BenchPath]:
    cuda = device.type == 'cuda'
    torch.manual_seed(0)
    model = build_evl(preset, backbone_precision=args.precision).to(device)
    for p in model.trainable_parameters(): torch.nn.init.normal_(p, std=0.02)
    plain_prec = 'fp16' if cuda else 'fp32'
    plain = official_formulation(model, backbone_precision=plain_prec)
    opt_model = torch.compile(model) if args.compile else model
    amp = torch.bfloat16 if args.precision == 'bf16' else torch.float16 if args.precision == 'fp16' else None
    o = BenchPath('optimised', opt_model, amp, args.precision == 'fp16', cuda, True, True,
              [f'tower {args.precision}, fp32 LayerNorms' + (', torch.compile' if args.compile else '')])
    p = BenchPath('plain', plain, torch.float16 if cuda else None, cuda, False, False, False,
              [f'tower {plain_prec}' + ('' if cuda else ' (fp16 matmul is slow or unsupported on CPU)')])
    return o, p


def make_steps(path: BenchPath, args, device, cfg):
    B, T = args.batch_size, cfg.num_frames
    size = getattr(path.model, '_orig_mod', path.model).backbone.tower.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (B, 3, T, size, size), dtype=torch.uint8, generator=g)
    f32 = normalize_clip(u8)
    if device.type == 'cuda': u8, f32 = u8.pin_memory(), f32.pin_memory()
    y = torch.randint(0, cfg.num_classes, (B,), generator=g).to(device)
    model = path.model
    base = getattr(model, '_orig_mod', model)
    ac = (lambda: torch.autocast(device.type, dtype=path.autocast)) if path.autocast else contextlib.nullcontext
    prepare = (lambda: normalize_clip(u8, device)) if path.uint8_input else (lambda: f32.to(device, non_blocking=True))
    kw = dict(fused=True) if path.fused_adamw else {}  # fused AdamW: one kernel per step
    opt = torch.optim.AdamW(base.param_groups(0.05), lr=1e-4, **kw)
    scaler = torch.amp.GradScaler(device.type) if path.scaler else None

    def train():
        model.train()
        with ac(): loss = F.cross_entropy(model(prepare()), y)
        if scaler: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        else: loss.backward(); opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with (torch.inference_mode() if path.inference_mode else torch.no_grad()), ac(): return model(prepare())
    return dict(train=train, infer=infer, resident=lambda: tensor_bytes(base, opt))


# ----------------------------------------------------------------------------------------------- reports
def fmt_mem(b, what):
    return 'n/a' if b is None else f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.0f} MiB'


def run_models(args, device) -> list[dict]:
    rows = []
    pk = peak_flops(device, args.peak_tflops)
    for preset in args.models:
        cfg = get_config(preset)
        t0 = time.perf_counter()
        o, p = make_paths(preset, args, device)
        steps = {path.name: make_steps(path, args, device, cfg) for path in (o, p)}
        # every (mode, path) pair interleaved in each repeat: a load change on a shared machine hits all alike
        sec_all = time_paths({(m, k): v[m] for m in args.modes for k, v in steps.items()}, device,
                             args.iters, args.warmup, args.repeats)
        for mode in args.modes:
            fns = {k: v[mode] for k, v in steps.items()}
            sec = {k: sec_all[(mode, k)] for k in fns}
            mem = ({k: peak_memory(fn, device, steps[k]['resident']) for k, fn in fns.items()}
                   if not args.no_memory else {})
            flops = count_flops(fns['plain']) if (device.type == 'cuda' or args.flops) else None
            row = dict(model=preset, mode=mode, batch=args.batch_size, device=device_name(device),
                       precision=args.precision, notes={'optimised': o.notes, 'plain': p.notes})
            for k in fns:
                row[f'{k}_clips_s'] = args.batch_size / sec[k]
                row[f'{k}_mem_bytes'], row['mem_kind'] = mem.get(k, (None, None))
                row[f'{k}_mfu'] = flops * (1 / sec[k]) / pk if (flops and pk) else None
            row['speedup'] = sec['plain'] / sec['optimised']
            row['gflop_per_clip'] = flops / args.batch_size / 1e9 if flops else None
            rows.append(row)
            print_row(row, header=len(rows) == 1)
        del o, p, steps
        if device.type == 'cuda': torch.cuda.empty_cache()
        print(f'    ({preset}: {time.perf_counter() - t0:.0f} s)', flush=True)
    return rows


COLS = ('model', 'mode', 'batch', 'optimised clips/s', 'plain clips/s', 'ratio', 'optimised mem', 'plain mem',
        'optimised MFU', 'plain MFU')


def print_row(r, header=False):
    if header:
        print('| ' + ' | '.join(COLS) + ' |'); print('|' + '|'.join('---' for _ in COLS) + '|')
    mfu = lambda v: 'n/a' if v is None else f'{100 * v:.1f}%'
    cells = [r['model'], r['mode'], r['batch'], f"{r['optimised_clips_s']:.3g}", f"{r['plain_clips_s']:.3g}",
             f"{r['speedup']:.2f}x", fmt_mem(r['optimised_mem_bytes'], r['mem_kind']),
             fmt_mem(r['plain_mem_bytes'], r['mem_kind']), mfu(r['optimised_mfu']), mfu(r['plain_mfu'])]
    print('| ' + ' | '.join(str(c) for c in cells) + ' |', flush=True)


def device_name(device):
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    import os
    return f'CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)'


# ----------------------------------------------------------------------------------------------- ablations
def tca_memory(device, grid=(14, 14), dim=768, heads=12, head_dim=64, backward=False) -> dict:
    "Peak extra memory and time of one TCA call (one frame pair, B/16 sizes): relative offsets vs gather."
    torch.manual_seed(0)
    tca = TemporalCrossAttention(grid, dim).to(device)
    for w in (tca.w1, tca.w2): torch.nn.init.normal_(w, std=0.02)
    L = grid[0] * grid[1] + 1
    q, k = torch.randn(2, 1, 2, L, heads, head_dim, device=device).unbind(0)
    out = {}
    for name, fn in (('offsets', lambda: tca(q, k)), ('gather', lambda: tca_gather(tca, q, k))):
        def call():
            if backward: fn().sum().backward(); tca.zero_grad(set_to_none=True)
            else:
                with torch.no_grad(): fn()
        call()
        b, _ = peak_memory(call, device)
        if device.type == 'cuda':  # total peak includes inputs and weights: subtract them
            sync(device); b -= torch.cuda.memory_allocated(device)
        out[name] = dict(bytes=b, sec=time_paths({name: call}, device, 5, 1, 5)[name])
    return out


def ablations(args, device) -> list[tuple[str, float, float, str]]:
    "Each optimisation alone: (what, optimised s, plain s, note)."
    res = []
    cuda = device.type == 'cuda'
    preset = args.ablate_model
    cfg = get_config(preset)
    torch.manual_seed(0)
    m = build_evl(preset).to(device).eval()
    for p in m.trainable_parameters(): torch.nn.init.normal_(p, std=0.02)
    ref = official_formulation(m)
    B = 1 if not cuda else args.batch_size
    size = m.backbone.tower.image_size; size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(B, 3, cfg.num_frames, size, size, device=device)
    frames = x.transpose(1, 2).flatten(0, 1)
    it, wu, rep = max(1, args.iters), 1, args.repeats
    t = time_paths({'o': lambda: m.backbone(frames), 'p': lambda: ref.backbone(frames)}, device, it, wu, rep)
    res.append(('backbone forward fp32: fused SDPA vs official attention', t['o'], t['p'], ''))
    with torch.no_grad(): feats = m.backbone_features(x)
    feats = [tuple(u.clone() for u in f) for f in feats]

    def dec(model):
        def f():
            model.decoder.train()
            model.decoder(feats)[:, 0].sum().backward(); model.zero_grad(set_to_none=True)
        return f
    t = time_paths({'o': dec(m), 'p': dec(ref)}, device, it, wu, rep)
    res.append(('decoder forward+backward fp32 (TCA offsets, folded cross attention vs official)', t['o'], t['p'], ''))
    with torch.no_grad(): t = time_paths({'o': lambda: m.decoder(feats), 'p': lambda: ref.decoder(feats)}, device, it, wu, rep)
    res.append(('decoder forward fp32', t['o'], t['p'], ''))

    def under(ctx):
        def f():
            with ctx(): m.backbone(frames)
        return f
    t = time_paths({'o': under(torch.inference_mode), 'p': under(torch.no_grad)}, device, it, wu, rep)
    res.append(('tower under inference_mode vs no_grad', t['o'], t['p'], ''))
    lp = 'bf16'
    m16 = build_evl(preset, backbone_precision=lp).to(device).eval()
    m16.backbone.load_state_dict(m.backbone.state_dict()); m16.backbone.set_precision(lp)
    t = time_paths({'o': lambda: m16.backbone(frames), 'p': lambda: m.backbone(frames)}, device, it, wu, rep)
    res.append((f'tower {lp} (fp32 LayerNorms) vs fp32', t['o'], t['p'], ''))
    if cuda:
        fp16 = official_formulation(m, backbone_precision='fp16')
        t = time_paths({'o': lambda: m16.backbone(frames), 'p': lambda: fp16.backbone(frames)}, device, it, wu, rep)
        res.append(('tower bf16 fused vs official fp16 unfused', t['o'], t['p'], ''))
        del fp16
        u8 = torch.randint(0, 256, (args.batch_size, 3, cfg.num_frames, size, size), dtype=torch.uint8).pin_memory()
        f32 = normalize_clip(u8).pin_memory()
        t = time_paths({'o': lambda: normalize_clip(u8, device), 'p': lambda: f32.to(device, non_blocking=True)},
                       device, 5, 2, rep)
        res.append((f'input batch {args.batch_size}: uint8 H2D + normalise on GPU vs float32 H2D', t['o'], t['p'], ''))
    del m16
    params = [torch.nn.Parameter(p.detach().clone().float()) for p in m.trainable_parameters()]
    for p in params: p.grad = torch.randn_like(p)
    try:
        fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
        plain = torch.optim.AdamW(params, lr=1e-4)
        t = time_paths({'o': fused.step, 'p': plain.step}, device, it * 3, wu, rep)
        res.append((f'AdamW step ({sum(p.numel() for p in params) / 1e6:.1f}M params): fused vs foreach', t['o'], t['p'], ''))
    except RuntimeError as e:
        res.append(('AdamW fused', float('nan'), float('nan'), f'unsupported: {e}'))
    if args.compile:
        cd = torch.compile(m.decoder)
        with torch.no_grad():
            t = time_paths({'o': lambda: cd(feats), 'p': lambda: m.decoder(feats)}, device, it, 2, rep)
        res.append(('decoder forward: torch.compile vs eager', t['o'], t['p'], ''))
    return res


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='+', default=None, help=f'presets (default: {" ".join(MODELS)})')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda[:n]')
    ap.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default=None,
                    help='optimised path: tower precision and decoder autocast (default bf16 on CUDA, fp32 on CPU)')
    ap.add_argument('--batch-size', type=int, default=None, help='clips per step (default 32 on CUDA, 1 on CPU)')
    ap.add_argument('--modes', nargs='+', choices=('train', 'infer'), default=['train', 'infer'])
    ap.add_argument('--iters', type=int, default=None, help='steps per timed repeat')
    ap.add_argument('--warmup', type=int, default=None, help='untimed steps first')
    ap.add_argument('--repeats', type=int, default=None, help='timed repeats; the median is reported')
    ap.add_argument('--compile', action='store_true', help='torch.compile the optimised model (and ablate the decoder)')
    ap.add_argument('--flops', action='store_true', help='count FLOPs on CPU too (always on CUDA)')
    ap.add_argument('--peak-tflops', type=float, default=None, help='device peak for MFU if the name is not known')
    ap.add_argument('--no-memory', action='store_true', help='skip the peak-memory pass')
    ap.add_argument('--no-ablations', action='store_true', help='skip the per-optimisation ablations and TCA memory')
    ap.add_argument('--ablate-model', default=None, help='preset for the ablations (default: first of --models)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    ap.add_argument('--no-malloc-tune', action='store_true', help='CPU: leave glibc malloc at its defaults')
    ap.add_argument('--quick', action='store_true', help='evl-tiny only, few iterations: seconds')
    ap.add_argument('--json', default=None, help='also write the results here')
    ap.add_argument('--markdown', default=None, help='replace a section of this file with the results')
    ap.add_argument('--section', default=None, help='the section --markdown replaces (default model-<device>-<precision>)')
    ap.add_argument('--from-json', default=None, help='measure nothing: render this earlier --json output')
    args = ap.parse_args(argv)
    if args.from_json:
        if not args.markdown: ap.error('--from-json needs --markdown FILE')
        out = load(args.from_json)
        replace_section(args.markdown, args.section or section_name(out), throughput_markdown(out))
        return out
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        ap.error('--device cuda: no CUDA device is available')
    cuda = device.type == 'cuda'
    if args.threads: torch.set_num_threads(args.threads)
    malloc = (not cuda and not args.no_malloc_tune and sys.platform.startswith('linux') and tune_glibc_malloc())
    args.precision = args.precision or ('bf16' if cuda else 'fp32')
    args.batch_size = args.batch_size or (32 if cuda else 1)
    if args.quick:
        args.models = args.models or ['evl-tiny']
        args.iters, args.warmup, args.repeats = args.iters or 2, args.warmup or 1, args.repeats or 3
    args.models = args.models or list(MODELS)
    args.iters = args.iters or (10 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (5 if cuda else 3)
    args.ablate_model = args.ablate_model or args.models[0]
    if args.batch_size < 1: ap.error(f'--batch-size={args.batch_size}: must be at least 1')
    if cuda: torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    print(f'# EVL model throughput on {device_name(device)}, torch {torch.__version__}'
          f'{"; glibc malloc keeps freed memory (mallopt M_MMAP_MAX=0, no trim; --no-malloc-tune to disable)" if malloc else ""}')
    print(f'# optimised: tower {args.precision} + fused SDPA, TCA by relative offsets, folded decoder attention, '
          f'{"uint8 H2D + GPU normalise, " if cuda else ""}fused AdamW, inference_mode'
          f'{", torch.compile" if args.compile else ""}')
    print(f'# plain (official formulation): tower {"fp16" if cuda else "fp32 (fp16 matmul is slow/unsupported on CPU)"}, '
          f'unfused attention, TCA by gather{", fp16 autocast + GradScaler, float32 H2D" if cuda else ""}, foreach AdamW')
    print(f'# medians of {args.repeats} repeats (all paths and modes interleaved in each) x {args.iters} steps after {args.warmup} warm-up; '
          f'memory: {"torch.cuda.max_memory_allocated over one step above the start, plus the weights and optimiser state of that path alone" if cuda else "peak extra bytes allocated during one step (torch profiler memory events)"}'
          f'; MFU: FLOPs of the official formulation (FlopCounterMode) / time / device bf16 peak\n')
    rows = run_models(args, device)
    machine = (device_name(device) if cuda else f'{cpu_name()}, {device_name(device)}') + f', torch {torch.__version__}'
    out = dict(device=device_name(device), torch=torch.__version__, args=vars(args), rows=rows,
               **provenance('model_throughput', machine, argv))
    if not args.no_ablations:
        print(f'\n## Each optimisation alone ({args.ablate_model}, batch {1 if not cuda else args.batch_size}; '
              f'ms per call, median of {args.repeats})\n')
        print('| optimisation | optimised ms | plain ms | ratio |'); print('|---|---|---|---|')
        abl = ablations(args, device)
        for what, a, b, note in abl:
            print(f'| {what} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f}x{" " + note if note else ""} |', flush=True)
        tcam = {}
        print('\n## Temporal cross attention, one frame pair at B/16 size (14x14 grid, C=768, 12 heads)\n')
        print('| pass | offsets extra memory | gather extra memory | memory ratio | offsets ms | gather ms |')
        print('|---|---|---|---|---|---|')
        for bw in (False, True):
            r = tca_memory(device, backward=bw); tcam['forward+backward' if bw else 'forward'] = r
            o, g = r['offsets'], r['gather']
            print(f"| {'forward+backward' if bw else 'forward (no grad)'} | {fmt_mem(o['bytes'], '')} | "
                  f"{fmt_mem(g['bytes'], '')} | {g['bytes'] / max(o['bytes'], 1):.0f}x | {1e3 * o['sec']:.2f} | {1e3 * g['sec']:.2f} |")
        out.update(ablations=abl, tca_memory=tcam)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str)); print(f'\nwrote {args.json}')
    if args.markdown: replace_section(args.markdown, args.section or section_name(out), throughput_markdown(out))
    return out


def section_name(out) -> str:
    "The default section of a run: model-cpu-fp32, model-cuda-bf16, ..."
    return f"model-{str(out['args']['device']).split(':')[0]}-{out['args']['precision']}"


def throughput_markdown(out) -> str:
    "A run as a markdown section: the stamp, the throughput rows, the ablations and the TCA memory if measured."
    mfu = lambda v: 'n/a' if v is None else f'{100 * v:.1f}%'
    rows = [(r['model'], r['mode'], r['batch'], f"{r['optimised_clips_s']:.3g}", f"{r['plain_clips_s']:.3g}",
             f"{r['speedup']:.2f}x", fmt_mem(r['optimised_mem_bytes'], ''), fmt_mem(r['plain_mem_bytes'], ''),
             mfu(r['optimised_mfu']), mfu(r['plain_mfu'])) for r in out['rows']]
    if all(r['optimised_mfu'] is None for r in out['rows']): rows, cols = [r[:-2] for r in rows], COLS[:-2]
    else: cols = COLS
    parts = [stamp(out), table(cols, rows)]
    if out.get('ablations'):
        parts.append(table(('optimisation', 'optimised ms', 'plain ms', 'ratio'),
                           [(w, f'{1e3 * a:.1f}', f'{1e3 * b:.1f}', f'{b / a:.2f}x' + (f' {n}' if n else ''))
                            for w, a, b, n in out['ablations']]))
    if out.get('tca_memory'):
        parts.append(table(('TCA, one frame pair at B/16 size', 'offsets extra memory', 'gather extra memory',
                            'memory ratio', 'offsets ms', 'gather ms'),
                           [(k, fmt_mem(r['offsets']['bytes'], ''), fmt_mem(r['gather']['bytes'], ''),
                             f"{r['gather']['bytes'] / max(r['offsets']['bytes'], 1):.0f}x",
                             f"{1e3 * r['offsets']['sec']:.2f}", f"{1e3 * r['gather']['sec']:.2f}")
                            for k, r in out['tca_memory'].items()]))
    return '\n\n'.join(parts)


if __name__ == '__main__':
    main()
