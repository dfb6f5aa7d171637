"""The papermill jobs nbs/train.ipynb and nbs/evaluate.ipynb: a tiny training run, parameter errors in the job's call,
and evaluation of an official-layout checkpoint with 3x1 and 1x3 views."""
import json
from pathlib import Path

import pytest
import torch

pm = pytest.importorskip('papermill')
from evl_nb.synthetic import make_synthetic_dataset
from evl_nb.checkpoints import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NB, EVAL_NB = ROOT / 'nbs' / 'train.ipynb', ROOT / 'nbs' / 'evaluate.ipynb'


def _run(nb, out, **params):
    return pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(out.parent), progress_bar=False,
                               kernel_name='python3', log_output=False)


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp('pm')
    make_synthetic_dataset(d / 'syn4', num_classes=4, train_per_class=3, val_per_class=2, num_frames=(8, 8), ssv2=False)
    return d


def _png_outputs(nb_file, call) -> int:
    "How many image/png outputs the executed notebook's cells calling `call` carry."
    nb = json.loads(Path(nb_file).read_text())
    return sum('image/png' in o.get('data', {}) for c in nb['cells'] if c['cell_type'] == 'code'
               and call in ''.join(c['source']) for o in c.get('outputs', []))


def _assert_png(path):
    assert Path(path).is_file(), f'{path} was not written'
    assert Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'


TINY = dict(num_classes=4, max_steps=3, batch_size=4, num_workers=0, eval_every=2)


@pytest.fixture(scope='module')
def tiny_run(syn):
    "The train notebook's tiny synthetic run (3 steps, evaluations at steps 2 and 3)."
    _run(TRAIN_NB, syn / 'train_out.ipynb', data_root=str(syn / 'syn4'), output_dir=str(syn / 'run'), **TINY)
    return syn / 'run'


def test_train_notebook_tiny_run(syn, tiny_run):
    out = tiny_run
    rows = read_metrics(out / 'metrics.csv')
    assert [r['step'] for r in rows if r['kind'] == 'train'] == [1, 2, 3]
    val = [r for r in rows if r['kind'] == 'val']
    assert [r['step'] for r in val] == [2, 3] and all(r['num_samples'] == 8 for r in val)
    assert all(r['loss'] == r['loss'] and r['loss'] > 0 for r in rows if r['kind'] == 'train')
    assert json.loads((out / 'results.json').read_text())['num_samples'] == 8
    s = json.loads((out / 'summary.json').read_text())
    assert s['steps'] == 3 and s['world_size'] == 1
    # train_report: the curves (loss, lr, validation) and the confusion matrix, as pictures in the notebook
    assert _png_outputs(syn / 'train_out.ipynb', 'train_report(') == 2, 'not both pictures in the executed notebook'
    for name in ('training_curves.png', 'confusion_matrix.png'): _assert_png(out / name)


@pytest.mark.slow
def test_train_notebook_launches_torchrun_for_two_processes(syn):
    """gpus=2 on a CPU machine: the notebook runs torchrun (gloo), streams its output and reads the summary. The val
    set holds 9 videos, an odd count on purpose: a padding sampler would count one twice over the 2 ranks."""
    root, out, n_val = syn / 'syn3x3', syn / 'run2', 9
    make_synthetic_dataset(root, num_classes=3, train_per_class=3, val_per_class=3, num_frames=(8, 8), ssv2=False)
    _run(TRAIN_NB, syn / 'train2_out.ipynb', data_root=str(root), num_classes=3, max_steps=2, batch_size=4,
         num_workers=0, eval_every=1, ckpt_every=1, output_dir=str(out), gpus=2,
         model_overrides=dict(decoder_num_layers=1))
    s = json.loads((out / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['steps'] == 2 and s['micro_batch'] == 2
    assert s['val']['num_samples'] == n_val and s['val']['num_dataset'] == n_val and s['val']['num_skipped'] == 0
    assert [x['num_samples'] for x in read_metrics(out / 'metrics.csv') if x['kind'] == 'val'] == [n_val, n_val]
    assert (out / 'checkpoints' / 'step_0000002.pt').exists()
    nb = json.loads((syn / 'train2_out.ipynb').read_text())
    text = ''.join(''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', []))
    assert 'torch.distributed.run' in text and 'SUMMARY' in text


@pytest.mark.parametrize('params,match,notebook', [
    (dict(dataset='ssv2'), 'data_root', True),
    (dict(dataset='hmdb51'), 'dataset=', False),
    (dict(model='evl-tiny'), 'model=', False),            # evl-tiny has 10 classes, the data 4
])
def test_train_notebook_parameter_errors(syn, params, match, notebook):
    """A bad parameter stops the job in its call, naming the parameter, before anything is trained: through papermill
    for the first case, through the job function the notebook calls (`train_job`) for the others."""
    from evl_nb.jobs import train_job
    params = dict(params, output_dir=str(syn / 'never'), max_steps=1)
    if 'dataset' not in params: params.update(data_root=str(syn / 'syn4'))
    if notebook:
        out = syn / 'err.ipynb'
        with pytest.raises(pm.PapermillExecutionError) as e: _run(TRAIN_NB, out, **params)
        assert match in e.value.evalue, e.value.evalue
        assert 'train_job(' in e.value.source, f'failed outside the job call: {e.value.source[:200]}'
    else:
        with pytest.raises((ValueError, FileNotFoundError), match=match): train_job(echo=lambda *a: None, **params)
    assert not (syn / 'never' / 'metrics.csv').exists()


def test_evaluate_notebook_official_checkpoint(syn):
    from evl_nb.model import build_evl
    torch.manual_seed(0)
    net = build_evl('evl-tiny', num_classes=4)
    torch.save({'model': {'module.' + k: v for k, v in net.state_dict().items()}}, syn / 'release.pth')
    classes = (syn / 'syn4' / 'annotations' / 'classes.txt').read_text().split('\n')[:4]
    (syn / 'release_classes.json').write_text(json.dumps(classes[::-1]))     # the release's own order
    for views in ('3x1', '1x3'):
        res = syn / f'eval_{views}.json'
        pngs = [syn / 'confusion_matrix.png', syn / 'per_class_accuracy.png']     # written next to output_json
        for f in pngs: f.unlink(missing_ok=True)
        _run(EVAL_NB, syn / f'eval_{views}.ipynb', checkpoint=str(syn / 'release.pth'), class_list=str(syn / 'release_classes.json'),
             model='evl-tiny', data_root=str(syn / 'syn4'), eval_views=views, num_workers=0, output_json=str(res))
        m = json.loads(res.read_text())
        assert m['num_samples'] == 8 and m['num_skipped'] == 0 and m['eval_views'] == views
        assert m['classes'] == classes[::-1]
        for k in ('top1', 'top5', 'mean_class_accuracy', 'per_class', 'worst_confusions', 'confusion_matrix'): assert k in m
        # evaluation_figures: the confusion matrix and the per-class accuracy
        assert _png_outputs(syn / f'eval_{views}.ipynb', 'evaluation_figures(') == 2, f'not both pictures ({views})'
        for f in pngs: _assert_png(f)


def _outputs_text(nb_file) -> str:
    nb = json.loads(Path(nb_file).read_text())
    return ''.join(''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', []))


def test_train_notebook_second_run_of_a_finished_job(syn, tiny_run):
    """Running the finished job again reports it (results printed) and evaluates nothing; reevaluate=True (through
    the job function the notebook calls) evaluates again."""
    files = [tiny_run / n for n in ('metrics.csv', 'results.json', 'summary.json')]
    before = {f: f.read_bytes() for f in files}
    out = syn / 'train_again.ipynb'
    _run(TRAIN_NB, out, data_root=str(syn / 'syn4'), output_dir=str(tiny_run), **TINY)
    text = _outputs_text(out)
    assert 'this run is complete' in text and 'top-1' in text and '"already_complete": true' in text, text[-3000:]
    assert {f: f.read_bytes() for f in files} == before
    from evl_nb.jobs import train_job                                  # the notebook's call, in this process
    threads = torch.get_num_threads()
    try: train_job(data_root=str(syn / 'syn4'), output_dir=str(tiny_run), reevaluate=True, echo=lambda *a: None, **TINY)
    finally: torch.set_num_threads(threads)
    vals = [r['step'] for r in read_metrics(tiny_run / 'metrics.csv') if r['kind'] == 'val']
    assert vals == [2, 3, 3]


def test_train_notebook_malformed_csv_line_is_an_annotation_error(syn):
    "papermill nbs/train.ipynb -p dataset k400 -p data_root <root with a malformed line>: the AnnotationError, file:line."
    root = syn / 'k400_bad'
    make_synthetic_dataset(root, num_classes=4, train_per_class=2, val_per_class=1, num_frames=(8, 8), ssv2=False)
    csv_file = root / 'annotations' / 'k400_train.csv'
    lines = csv_file.read_text().splitlines()
    lines[3] = lines[3].rsplit(',', 2)[0]                                  # line 4 loses two fields
    csv_file.write_text('\n'.join(lines) + '\n')
    out = syn / 'bad_csv.ipynb'
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(TRAIN_NB, out, dataset='k400', data_root=str(root), model='evl-tiny', num_classes=4, output_dir=str(syn / 'never_k400'))
    assert e.value.ename == 'AnnotationError', (e.value.ename, e.value.evalue)
    assert f'{csv_file}:4:' in e.value.evalue and 'train_ann' in e.value.evalue, e.value.evalue
    assert 'train_job(' in e.value.source, f'failed outside the job call: {e.value.source[:200]}'


def test_train_options_are_the_notebook_parameters():
    "One source: every parameter of nbs/train.ipynb has the help (inline comment) and type of evl_nb.config.TRAIN_OPTIONS."
    from evl_nb.config import TRAIN_OPTIONS
    from evl_nb.slurm import SLURM_OPTIONS                  # the cluster submission's options (slurm_partition, ...)
    TRAIN_OPTIONS = {**TRAIN_OPTIONS, **{o.name: o for o in SLURM_OPTIONS}}
    params = pm.inspect_notebook(str(TRAIN_NB))
    assert set(params) - set(TRAIN_OPTIONS) == set(), 'notebook parameters without an option'
    assert {'dataset', 'data_root', 'lr', 'gpus', 'nodes', 'resume', 'reevaluate', 'class_list'} <= set(params)
    def hint(t):
        parts = [p.strip() for p in t.split('|')]
        if len(parts) == 1: return t
        return f'Optional[{parts[0]}]' if parts[1:] == ['None'] else f'Union[{", ".join(parts)}]'
    for name, p in params.items():
        o = TRAIN_OPTIONS[name]
        assert p['help'] == o.help, (name, p['help'], o.help)
        assert p['inferred_type_name'] == hint(o.type), (name, p['inferred_type_name'], o.type)
