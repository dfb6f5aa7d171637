"""Datasets as they are downloaded (issue 25, the acceptance journeys). Every training run here is the job of
`nbs/train.ipynb` given only `dataset` and `data_root` (plus tiny-model settings): one run per layout (the nine
K400 / SSv2 layouts and a clip store made from one of them; the store through papermill, the others through the
job function), the early failure when a split has no video, and the 30%-missing runs of K400 and SSv2. Also: the
evaluation's val set found from `data_root` in every layout, `nbs/evaluate.ipynb -p convention mmaction2 -p
output_dir D` against the function-level result, `evl-nb prepare check` and `nbs/prepare.ipynb` on a miniature with
a missing, a duplicated and a broken file, and the unreadable counts of a 2-process run merged once per file."""
import json, os, shutil, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

pm = pytest.importorskip('papermill')
from evl_nb.synthetic import make_synthetic_dataset
from evl_nb.checkpoints import read_metrics
from miniatures import LAYOUTS, SPLITS, expected_files, make_layout

pytestmark = pytest.mark.slow          # papermill training jobs on every download layout: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NB, EVAL_NB, PREPARE_NB = (ROOT / 'nbs' / f'{n}.ipynb' for n in ('train', 'evaluate', 'prepare'))
SCRIPT = Path(sys.executable).parent / 'evl-nb'
ENV = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
# a 2-step run of a 1-layer EVL-tiny decoder: what every layout's job trains
TINY = dict(model='evl-tiny', num_classes=3, max_steps=2, batch_size=2, num_workers=0, eval_views='1x1', threads=1,
            model_overrides=dict(decoder_num_layers=1))


def _run(nb, out, **params):
    return pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(out.parent), progress_bar=False,
                               kernel_name='python3', log_output=False)


def _text(nb_file) -> str:
    "Every stream and plain-text output of an executed notebook (the evl_nb log lines go to stderr)."
    nb = json.loads(Path(nb_file).read_text())
    return ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
                   for c in nb['cells'] for o in c.get('outputs', []))


def _pngs(nb_file) -> int:
    nb = json.loads(Path(nb_file).read_text())
    return sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))


def _is_png(path) -> bool: return Path(path).is_file() and Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    "3 classes: 6 train and 3 val videos (mp4 for K400, webm for SSv2)."
    return make_synthetic_dataset(tmp_path_factory.mktemp('syn') / 'syn', num_classes=3, train_per_class=2,
                                  val_per_class=1, num_frames=(8, 8))


@pytest.fixture(scope='module')
def syn10(tmp_path_factory):
    "5 classes: 10 train and 10 val videos, for the 30%-missing runs."
    return make_synthetic_dataset(tmp_path_factory.mktemp('syn10') / 'syn', num_classes=5, train_per_class=2,
                                  val_per_class=2, num_frames=(8, 8))


def _store_layout(syn, tmp_path):
    "The SSv2 20BN layout whose videos are only in a clip store: the files are emptied after `build_store`."
    from evl_nb.store import build_store
    dataset, root = make_layout(syn, tmp_path, 'ssv2-20bn-root')
    st = build_store(root / '20bn-something-something-v2', tmp_path / 'store', num_workers=1, progress=False)
    assert st.last_build['failed'] == 0 and st.last_build['videos'] == 9
    for f in (root / '20bn-something-something-v2').glob('*.webm'): f.write_bytes(b'')
    return dataset, root, dict(store=str(tmp_path / 'store'))


# the layout whose run goes through papermill (K400 and SSv2 layouts go through it in the 30%-missing runs below,
# a K400 store in tests/test_store.py); the others call the job function the notebook calls (`train_job`,
# tests/test_jobs.py) in this process: the same parameters and checks, without a kernel's start-up
NOTEBOOK_RUNS = ('ssv2-20bn-root+store',)


def _train_here(**params) -> str:
    "`train_job(**params)` in this process: the evl_nb log lines it wrote (the notebook shows them on stderr)."
    import logging
    from evl_nb.jobs import train_job
    lines, threads = [], torch.get_num_threads()
    h = logging.Handler(); h.emit = lambda rec: lines.append(rec.getMessage())
    logging.getLogger('evl_nb').addHandler(h)
    try: train_job(echo=lambda *a: None, **params)
    finally: logging.getLogger('evl_nb').removeHandler(h); torch.set_num_threads(threads)
    return '\n'.join(lines)


@pytest.mark.parametrize('key', list(LAYOUTS) + ['ssv2-20bn-root+store'])
def test_training_job_on_every_layout(syn, tmp_path, key):
    """`papermill nbs/train.ipynb -p dataset D -p data_root R` (tiny model), or its job function for the layouts
    outside `NOTEBOOK_RUNS`: every video found, 2 steps trained, evaluated."""
    if key.endswith('+store'): dataset, root, extra = _store_layout(syn, tmp_path)
    else: (dataset, root), extra = make_layout(syn, tmp_path, key), {}
    out, nb = tmp_path / 'run', tmp_path / 'train.ipynb'
    params = dict(dataset=dataset, data_root=str(root), output_dir=str(out), **extra, **TINY)
    if key in NOTEBOOK_RUNS: _run(TRAIN_NB, nb, **params); text = _text(nb)
    else: text = _train_here(**params)
    assert [r['step'] for r in read_metrics(out / 'metrics.csv') if r['kind'] == 'train'] == [1, 2]
    s = json.loads((out / 'summary.json').read_text())
    assert s['videos'] == dict(train=dict(annotated=6, found=6, missing=0, unreadable=0),
                               val=dict(annotated=3, found=3, missing=0, unreadable=0, scored=3)), s['videos']
    name = LAYOUTS[key.split('+')[0]][2]
    for split in SPLITS:
        assert f"{dataset}/{split}: layout '{name}'" in text, text[-3000:]             # the one line naming the choice
        assert f'{dataset}/{split}: all {3 if split == "val" else 6} annotated videos found' in text
    assert 'top-1' in text and 'on 3 of 3 annotated videos (0 missing, 0 unreadable)' in text


@pytest.mark.parametrize('key', list(LAYOUTS))
def test_evaluation_finds_the_val_set_from_data_root_alone(syn, tmp_path, key):
    from evl_nb.evaluate import eval_dataset
    from evl_nb.model import get_config
    dataset, root = make_layout(syn, tmp_path, key)
    vs = eval_dataset(dataset, str(root), None, get_config('evl-tiny'), '1x1')
    assert sorted(Path(p).name for p, _, _ in vs.samples) == expected_files(syn, dataset, 'val')


def test_job_without_a_val_video_fails_early_naming_the_folders(syn, tmp_path):
    "Every val video removed: the job stops within 30 s, in its data cell (no model built), with one message."
    dataset, root = make_layout(syn, tmp_path, 'k400-cvdfoundation')
    for f in (root / 'val').glob('*.mp4'): f.unlink()
    out, nb = tmp_path / 'run', tmp_path / 'train.ipynb'
    t0 = time.time()
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(TRAIN_NB, nb, dataset=dataset, data_root=str(root), output_dir=str(out), **TINY)
    assert time.time() - t0 < 30
    msg = e.value.evalue
    assert e.value.ename == 'FileNotFoundError' and msg.count('folders searched') == 1, msg
    assert f'folders searched: {root / "val"}' in msg and 'none of the 3 videos annotated in' in msg, msg
    assert 'train_job(' in e.value.source, f'failed outside the job call: {e.value.source[:200]}'
    assert not (out / 'checkpoints').exists() and not (out / 'metrics.csv').exists()


@pytest.mark.parametrize('key', ['k400-cvdfoundation', 'ssv2-current'])
def test_job_with_30_percent_missing_trains_and_counts(syn10, tmp_path, key):
    "3 of 10 videos of each split removed: it trains, says 70% found per split, lists the missing, counts the scored."
    dataset, root = make_layout(syn10, tmp_path, key)
    vdir = {s: root / LAYOUTS[key][3](s) for s in SPLITS}
    gone = {}
    for s in SPLITS:
        names = expected_files(syn10, dataset, s)[:3]
        gone[s] = sorted(str(vdir[s] / n) for n in names)
        for n in names: (vdir[s] / n).unlink()
    out, nb = tmp_path / 'run', tmp_path / 'train.ipynb'
    _run(TRAIN_NB, nb, dataset=dataset, data_root=str(root), output_dir=str(out), **dict(TINY, num_classes=5))
    text = _text(nb)
    for s in SPLITS:
        assert f'{dataset}/{s}: 7 of 10 annotated videos found (70.0%), 3 missing' in text, text[-3000:]
        listed = (out / f'missing_{s}.txt').read_text().splitlines()
        assert sorted(l.split('\t')[0] for l in listed) == gone[s]
    s = json.loads((out / 'summary.json').read_text())
    assert s['videos'] == dict(train=dict(annotated=10, found=7, missing=3, unreadable=0),
                               val=dict(annotated=10, found=7, missing=3, unreadable=0, scored=7))
    assert (s['val']['num_samples'], s['val']['num_annotated'], s['val']['num_missing']) == (7, 10, 3)
    assert [r['step'] for r in read_metrics(out / 'metrics.csv') if r['kind'] == 'train'] == [1, 2]
    assert 'on 7 of 10 annotated videos (3 missing, 0 unreadable)' in text


def test_evaluate_notebook_convention_and_output_dir(syn, tmp_path):
    """`-p convention mmaction2` reaches the evaluation's inputs: the notebook's metrics equal those of
    prepare_evaluation(convention='mmaction2') + evaluate, whose clips differ from the official convention's;
    `-p output_dir D` puts the results, the pictures and the missing list under D, nothing elsewhere."""
    from evl_nb.evaluate import evaluate, prepare_evaluation
    from evl_nb.model import build_evl
    dataset, root = make_layout(syn, tmp_path, 'k400-cvdfoundation')
    sorted((root / 'val').glob('*.mp4'))[0].unlink()                  # one missing: its list goes under D too
    torch.manual_seed(0)
    torch.save({'model': build_evl('evl-tiny', num_classes=3).state_dict()}, tmp_path / 'release.pth')
    (tmp_path / 'classes.json').write_text(json.dumps(sorted(syn['class_names'])))       # the release's output order
    params = dict(checkpoint=str(tmp_path / 'release.pth'), class_list=str(tmp_path / 'classes.json'), model='evl-tiny',
                  dataset='k400', data_root=str(root), eval_views='1x3', num_workers=0)
    work = tmp_path / 'work'; work.mkdir()
    d = tmp_path / 'D'
    _run(EVAL_NB, work / 'eval.ipynb', convention='mmaction2', output_dir=str(d), **params)
    assert sorted(p.name for p in d.iterdir()) == ['confusion_matrix.png', 'missing_val.txt', 'per_class_accuracy.png',
                                                   'results.json']
    assert _is_png(d / 'confusion_matrix.png') and _is_png(d / 'per_class_accuracy.png')
    assert sorted(p.name for p in work.iterdir()) == ['eval.ipynb']            # nothing outside D
    nb = json.loads((d / 'results.json').read_text())
    fn = {}
    for conv in ('mmaction2', 'official'):
        job = prepare_evaluation(**params, convention=conv, output_dir=str(tmp_path / f'fn_{conv}'))
        m = evaluate(job['model'], job['val_set'], batch_size=4, classes=job['classes'], label_map=job['label_map'],
                     return_probs=True)
        fn[conv] = (m, job['val_set'])
    m = fn['mmaction2'][0]
    assert nb['convention'] == m['convention'] == 'mmaction2' and fn['official'][0]['convention'] == 'official'
    for k in ('top1', 'top5', 'mean_class_accuracy', 'confusion_matrix', 'per_class', 'num_samples', 'num_annotated'):
        assert nb[k] == json.loads(json.dumps(m[k])), k
    assert (nb['num_samples'], nb['num_annotated'], nb['num_missing']) == (2, 3, 1)
    # the convention changes what the model sees: 8-frame clips padded by looping (mmaction2) vs clamping (official)
    assert not torch.equal(fn['mmaction2'][1][0]['video'], fn['official'][1][0]['video'])
    assert not torch.allclose(fn['mmaction2'][0]['probs'], fn['official'][0]['probs'])


@pytest.fixture(scope='module')
def sick(syn, tmp_path_factory):
    "K400 (cvdfoundation) with one val video missing, one train video in two places and one train file broken."
    tmp = tmp_path_factory.mktemp('sick')
    dataset, root = make_layout(syn, tmp, 'k400-cvdfoundation')
    vids = sorted((root / 'train').glob('*.mp4'))
    (root / 'train' / 'copies').mkdir(); shutil.copy(vids[0], root / 'train' / 'copies' / vids[0].name)
    vids[1].write_text('<html><body>Video unavailable</body></html>')
    gone = sorted((root / 'val').glob('*.mp4'))[0]; gone.unlink()
    return root, dict(dup=vids[0], broken=vids[1], gone=gone)


SICK = dict(train=dict(annotated=6, found=6, missing=0, duplicates=1, unreadable=1, usable=5),
            val=dict(annotated=3, found=2, missing=1, duplicates=0, unreadable=0, usable=2))


def _counts(report) -> dict:
    return {s: {k: x[k] for k in SICK['train']} for s, x in report['splits'].items()}


def test_prepare_check_reports_missing_duplicated_and_broken(sick, tmp_path):
    "`evl-nb prepare check`: each problem counted and named in the JSON, the PNG written, exit status 0 (usable)."
    root, bad = sick
    r = subprocess.run([str(SCRIPT), 'prepare', 'check', '--dataset', 'k400', '--data-root', str(root), '--json',
                        str(tmp_path / 'r.json'), '--png', str(tmp_path / 'r.png'), '--workers', '1', '--no-progress'],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / 'r.json').read_text())
    assert _counts(rep) == SICK and rep['usable'] is True
    tr, va = rep['splits']['train'], rep['splits']['val']
    assert va['missing_files'] == [str(bad['gone'])]
    assert [(d['id'], d['listed'], len(d['files'])) for d in tr['duplicate_ids']] == [(bad['dup'].stem, 1, 2)]
    assert [(u['path'], u['reason']) for u in tr['unreadable_files']] == [(str(bad['broken']), 'unreadable')]
    assert (tr['layout'], rep['estimate']['videos']) == ('cvdfoundation', 7)
    assert _is_png(tmp_path / 'r.png')
    assert 'usable: yes' in r.stdout and 'train  cvdfoundation' in r.stdout


def test_prepare_check_exit_status_when_nothing_is_usable(syn, tmp_path):
    dataset, root = make_layout(syn, tmp_path, 'ssv2-mmaction2')
    for f in (root / 'videos').glob('*.webm'): f.write_bytes(b'')          # every file empty
    cmd = [str(SCRIPT), 'prepare', 'check', '--dataset', 'ssv2', '--data-root', str(root), '--no-progress',
           '--json', str(tmp_path / 'r.json')]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    rep = json.loads((tmp_path / 'r.json').read_text())
    assert rep['usable'] is False and rep['splits']['train']['unreadable'] == 6 and 'usable: NO' in r.stdout
    r = subprocess.run(cmd[:6] + [str(tmp_path / 'nope')], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and 'data_root=' in r.stderr and r.stderr.count('\n') == 1, r.stderr


def test_prepare_notebook_shows_the_same_report(sick, tmp_path):
    "nbs/prepare.ipynb: the CLI's JSON counts, its histograms as a picture; with nothing usable the job fails."
    from evl_nb.cli import main
    root, _ = sick
    assert main(['prepare', 'check', '--dataset', 'k400', '--data-root', str(root), '--json', str(tmp_path / 'cli.json'),
                 '--decode', '--no-progress']) == 0
    _run(PREPARE_NB, tmp_path / 'prepare.ipynb', dataset='k400', data_root=str(root), decode=True,
         output_dir=str(tmp_path / 'out'))
    nb_rep, cli_rep = (json.loads(p.read_text()) for p in (tmp_path / 'out' / 'report.json', tmp_path / 'cli.json'))
    assert _counts(nb_rep) == _counts(cli_rep) == SICK and nb_rep == cli_rep
    assert _is_png(tmp_path / 'out' / 'histograms.png') and _pngs(tmp_path / 'prepare.ipynb') == 1
    assert 'usable: yes' in _text(tmp_path / 'prepare.ipynb')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(PREPARE_NB, tmp_path / 'empty.ipynb', dataset='k400', data_root=str(tmp_path / 'empty'),
             output_dir=str(tmp_path / 'out2'))
    assert 'nothing usable' in e.value.evalue and (tmp_path / 'out2' / 'report.json').is_file()


class _Skipped:
    "A split whose loader on this rank met the files `skipped`."
    def __init__(self, skipped): self.skipped = dict.fromkeys(skipped, 'unreadable')
    video_counts = property(lambda self: dict(annotated=10, found=9, missing=1, unreadable=len(self.skipped)))


def _rank(rank, port, out):
    import torch.distributed as dist
    from evl_nb.train import run_video_counts
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    mine = [['a.mp4', 'b.mp4'], ['b.mp4', 'c.mp4']][rank]
    c = run_video_counts(_Skipped(mine), _Skipped(mine[:1]), dict(num_samples=8))
    Path(out, f'{rank}.json').write_text(json.dumps(c))
    dist.destroy_process_group()


def test_unreadable_counts_merge_over_ranks(tmp_path):
    "Two gloo processes: each file any rank could not read is counted once (a, b, c: 3, not 2 + 2), on every rank."
    import multiprocessing as mp
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    ctx = mp.get_context('fork')
    procs = [ctx.Process(target=_rank, args=(r, port, tmp_path)) for r in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    want = dict(train=dict(annotated=10, found=9, missing=1, unreadable=3),
                val=dict(annotated=10, found=9, missing=1, unreadable=2, scored=8))
    assert [json.loads((tmp_path / f'{r}.json').read_text()) for r in range(2)] == [want, want]
