"""The basic workflow end to end, on files the trainer wrote: train a few steps through the trainer, then open its
`best.pt` and last `step_*.pt` with plain `torch.load(weights_only=True)`, evaluate both with nbs/evaluate.ipynb and
explore both with nbs/explore.ipynb (papermill)."""
import json
from pathlib import Path

import pytest
import torch

pm = pytest.importorskip('papermill')
from evl_nb.synthetic import make_synthetic_dataset
from evl_nb.config import TrainConfig
from evl_nb.checkpoints import latest_checkpoint
from evl_nb.train import run

pytestmark = pytest.mark.slow          # trains, then runs the job notebooks on the checkpoint: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
EVAL_NB, EXPLORE_NB = ROOT / 'nbs' / 'evaluate.ipynb', ROOT / 'nbs' / 'explore.ipynb'


def _run(nb, out, **params):
    return pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(out.parent), progress_bar=False,
                               kernel_name='python3', log_output=False)


def _text(nb_file) -> str:
    nb = json.loads(Path(nb_file).read_text())
    return ''.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
                   for c in nb['cells'] for o in c.get('outputs', []))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A 4-step trainer run (evl-tiny, random tower, 4 synthetic classes): evaluations at steps 2 and 4."
    d = tmp_path_factory.mktemp('journey')
    make_synthetic_dataset(d / 'syn', num_classes=4, train_per_class=3, val_per_class=2, num_frames=(8, 8), ssv2=False)
    s = run(TrainConfig(dataset='synthetic', data_root=str(d / 'syn'), model='evl-tiny', num_classes=4, batch_size=4,
                        max_steps=4, ckpt_every=2, eval_every=2, eval_views='1x1', num_workers=0, output_dir=str(d / 'run'),
                        progress=False, lr=5e-3, model_overrides=dict(decoder_num_layers=2)))
    assert s['steps'] == 4 and s['val']['num_samples'] == 8
    return d


def _checkpoints(d):
    ck = d / 'run' / 'checkpoints'
    return {'best': ck / 'best.pt', 'last': latest_checkpoint(ck)}


def test_trainer_checkpoints_open_weights_only(trained):
    cks = _checkpoints(trained)
    assert cks['last'].name == 'step_0000004.pt'
    for name, path in cks.items():
        ck = torch.load(path, weights_only=True)          # plain torch.load, no allow-listing
        assert {'model', 'optimizer', 'rng', 'config', 'model_config', 'classes', 'step'} <= set(ck), name
        assert isinstance(ck['rng'][0]['numpy']['keys'], torch.Tensor)
        assert len(ck['classes']) == 4 and all(isinstance(c, str) for c in ck['classes'])


@pytest.mark.parametrize('which', ['best', 'last'])
def test_evaluate_notebook_on_trainer_checkpoint(trained, which):
    """The notebook (`best`) or the job function it calls (`last`, in this process) rebuilds the model (and the run's
    random tower) from the file: it scores exactly what the trainer scored."""
    from evl_nb.jobs import evaluate_job
    path = _checkpoints(trained)[which]
    res = trained / f'eval_{which}.json'
    params = dict(checkpoint=str(path), data_root=str(trained / 'syn'), eval_views='1x1', num_workers=0,
                  output_json=str(res))
    if which == 'best': _run(EVAL_NB, trained / f'eval_{which}.ipynb', **params)
    else: evaluate_job(**params, progress=False, echo=lambda *a: None)
    m = json.loads(res.read_text())
    assert m['num_samples'] == 8 and m['num_skipped'] == 0 and m['checkpoint'] == str(path)
    ck = torch.load(path, weights_only=True)
    assert m['classes'] == ck['classes']
    if which == 'best':
        assert m['top1'] == ck['val_metrics']['top1'] and m['top5'] == ck['val_metrics']['top5']
    else:   # the trainer's final evaluation (results.json) was made on the step-4 weights
        final = json.loads((trained / 'run' / 'results.json').read_text())
        assert m['confusion_matrix'] == final['confusion_matrix'] and m['top1'] == final['top1']


@pytest.mark.parametrize('which', ['best', 'last'])
def test_explore_notebook_on_trainer_checkpoint(trained, which):
    path = _checkpoints(trained)[which]
    out = trained / f'explore_{which}.ipynb'
    _run(EXPLORE_NB, out, checkpoint=str(path))
    text = _text(out)
    assert '2 decoder layers, 4 classes' in text, text[-2000:]      # the checkpoint's own config, not the preset's
    classes = torch.load(path, weights_only=True)['classes']
    assert any(c in text for c in classes)                            # top-5 printed with the run's class names
    nb = json.loads(out.read_text())
    assert any('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))


def test_in_memory_run_is_evaluated_at_its_own_scale(tmp_path):
    """An in_memory run trains on crops cut from frames of short side input + input // 7 and tests there
    (`eval_short_side`); `prepare_evaluation` on its checkpoint reads that scale back and scores exactly what the
    trainer scored, where the plain input-size scale scores other probabilities."""
    from evl_nb.evaluate import evaluate, prepare_evaluation
    make_synthetic_dataset(tmp_path / 'syn', num_classes=4, train_per_class=3, val_per_class=2, num_frames=(8, 8),
                           ssv2=False)
    cfg = TrainConfig(dataset='synthetic', data_root=str(tmp_path / 'syn'), model='evl-tiny', num_classes=4, batch_size=4,
                      max_steps=6, ckpt_every=0, eval_views='1x3', num_workers=0, output_dir=str(tmp_path / 'run'),
                      progress=False, lr=5e-3, in_memory=True, cache_features=2, model_overrides=dict(decoder_num_layers=2))
    assert cfg.resolve().eval_short_side == 128                   # evl-tiny: 112 + 112 // 7
    run(cfg)
    ck = latest_checkpoint(tmp_path / 'run' / 'checkpoints')
    job = prepare_evaluation(ck, dataset='synthetic', data_root=str(tmp_path / 'syn'), eval_views='1x3',
                             runs_dir=str(tmp_path / 'run'))
    assert job['val_set'].short_side == 128
    m = evaluate(job['model'], job['val_set'], classes=job['classes'], label_map=job['label_map'], return_probs=True)
    final = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert m['confusion_matrix'] == final['confusion_matrix'] and m['top1'] == final['top1']
    other = prepare_evaluation(ck, dataset='synthetic', data_root=str(tmp_path / 'syn'), eval_views='1x3',
                               runs_dir=str(tmp_path / 'run'), eval_short_side=112)
    assert other['val_set'].short_side == 112
    p112 = evaluate(other['model'], other['val_set'], label_map=other['label_map'], return_probs=True)['probs']
    assert not torch.allclose(torch.as_tensor(p112), torch.as_tensor(m['probs']), atol=1e-4)


def test_a_class_subset_run_is_evaluated_on_its_own_classes(tmp_path):
    """The demo trains on a subset of the synthetic classes (no rotations). Evaluating its checkpoint where no
    dataset exists yet generates one with the checkpoint's classes, in its order, each drawn with its own motion:
    not the first n classes under the checkpoint's names."""
    from evl_nb.evaluate import evaluate, prepare_evaluation
    from evl_nb.synthetic import DEMO_CLASSES, load_object_tracks
    names = DEMO_CLASSES[6:]                                  # appearing, disappearing, brightening, darkening
    make_synthetic_dataset(tmp_path / 'syn', classes=names, train_per_class=2, val_per_class=1, num_frames=(8, 8),
                           ssv2=False)
    run(TrainConfig(dataset='synthetic', data_root=str(tmp_path / 'syn'), model='evl-tiny', num_classes=4,
                    batch_size=4, max_steps=2, ckpt_every=0, eval_views='1x1', num_workers=0, progress=False,
                    output_dir=str(tmp_path / 'run'), model_overrides=dict(decoder_num_layers=2)))
    ck = latest_checkpoint(tmp_path / 'run' / 'checkpoints')
    job = prepare_evaluation(ck, dataset='synthetic', data_root=str(tmp_path / 'fresh'), runs_dir=str(tmp_path / 'run'))
    assert job['val_set'].classes == names and job['classes'] == names
    tracks = [t for k, t in load_object_tracks(tmp_path / 'fresh').items() if k.endswith('.mp4') and t['split'] == 'val']
    by_label = {t['label']: t for t in tracks}
    assert by_label[0]['visibility'][0] < by_label[0]['visibility'][-1]        # appearing
    assert by_label[1]['visibility'][0] > by_label[1]['visibility'][-1]        # disappearing
    m = evaluate(job['model'], job['val_set'], classes=job['classes'], label_map=job['label_map'])
    assert m['num_samples'] == len(names) * 4
