"""The papermill jobs nbs/train.ipynb and nbs/evaluate.ipynb: a tiny training run, parameter errors in the first cells,
and evaluation of an official-layout checkpoint with 3x1 and 1x3 views."""
import json
from pathlib import Path

import pytest
import torch

pm = pytest.importorskip('papermill')
from evl_nb.synthetic import make_synthetic_dataset
from evl_nb.train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NB, EVAL_NB = ROOT / 'nbs' / 'train.ipynb', ROOT / 'nbs' / 'evaluate.ipynb'
TRAIN_CELL = 4    # code cells: parameters, injected parameters, checks, data, TRAIN: errors must come before it


def _run(nb, out, **params):
    return pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(out.parent), progress_bar=False,
                               kernel_name='python3', log_output=False)


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp('pm')
    make_synthetic_dataset(d / 'syn4', num_classes=4, train_per_class=3, val_per_class=2, num_frames=(8, 8), ssv2=False)
    return d


def _code_cell_index(nb_path, cell_index):
    "Index among code cells of the failing cell (papermill reports the index among all cells)."
    nb = json.loads(Path(nb_path).read_text())
    return sum(1 for c in nb['cells'][:cell_index + 1] if c['cell_type'] == 'code') - 1


def test_train_notebook_tiny_run(syn):
    out = syn / 'run'
    _run(TRAIN_NB, syn / 'train_out.ipynb', data_root=str(syn / 'syn4'), num_classes=4, max_steps=3, batch_size=4,
         num_workers=0, eval_every=2, output_dir=str(out))
    rows = read_metrics(out / 'metrics.csv')
    assert [r['step'] for r in rows if r['kind'] == 'train'] == [1, 2, 3]
    val = [r for r in rows if r['kind'] == 'val']
    assert [r['step'] for r in val] == [2, 3] and all(r['num_samples'] == 8 for r in val)
    assert all(r['loss'] == r['loss'] and r['loss'] > 0 for r in rows if r['kind'] == 'train')
    assert json.loads((out / 'results.json').read_text())['num_samples'] == 8
    s = json.loads((out / 'summary.json').read_text())
    assert s['steps'] == 3 and s['world_size'] == 1
    nb = json.loads((syn / 'train_out.ipynb').read_text())
    assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
               for c in nb['cells'] for o in c.get('outputs', [])), 'no plots in the executed notebook'


@pytest.mark.slow
def test_train_notebook_launches_torchrun_for_two_processes(syn):
    "gpus=2 on a CPU machine: the notebook runs torchrun (gloo), streams its output and reads the summary."
    out = syn / 'run2'
    _run(TRAIN_NB, syn / 'train2_out.ipynb', data_root=str(syn / 'syn4'), num_classes=4, max_steps=2, batch_size=4,
         num_workers=0, output_dir=str(out), gpus=2)
    s = json.loads((out / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['steps'] == 2 and s['val']['num_samples'] == 8
    nb = json.loads((syn / 'train2_out.ipynb').read_text())
    text = ''.join(''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', []))
    assert 'torch.distributed.run' in text and 'SUMMARY' in text


@pytest.mark.parametrize('params,match', [
    (dict(dataset='ssv2'), 'data_root'),
    (dict(dataset='hmdb51'), 'dataset='),
    (dict(model='evl-tiny'), 'model='),            # evl-tiny has 10 classes, the data 4
])
def test_train_notebook_parameter_errors(syn, params, match):
    params = dict(params)
    if 'dataset' not in params: params.update(data_root=str(syn / 'syn4'))
    out = syn / f'err_{"_".join(map(str, params.values()))[:40].replace("/", "_")}.ipynb'
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(TRAIN_NB, out, output_dir=str(syn / 'never'), max_steps=1, **params)
    assert match in e.value.evalue, e.value.evalue
    assert _code_cell_index(out, e.value.cell_index) < TRAIN_CELL, f'failed late, in cell {e.value.cell_index}'
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
        _run(EVAL_NB, syn / f'eval_{views}.ipynb', checkpoint=str(syn / 'release.pth'), class_list=str(syn / 'release_classes.json'),
             model='evl-tiny', data_root=str(syn / 'syn4'), eval_views=views, num_workers=0, output_json=str(res))
        m = json.loads(res.read_text())
        assert m['num_samples'] == 8 and m['num_skipped'] == 0 and m['eval_views'] == views
        assert m['classes'] == classes[::-1]
        for k in ('top1', 'top5', 'mean_class_accuracy', 'per_class', 'worst_confusions', 'confusion_matrix'): assert k in m
