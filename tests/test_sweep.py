"""`evl-nb sweep`: a 2x2 grid (lr x model.decoder_num_layers) SIGKILLed during its third run and run again (the
first two untouched, the third resumed, the fourth run), `nbs/compare.ipynb` on the result, the SLURM form as a job
array through submitit's local executor, and bad grids named."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from evl_nb import cli
from evl_nb.sweep import read_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / 'evl-nb'
ENV = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=str(ROOT))
RUNS = ['lr=0.003+decoder_num_layers=2', 'lr=0.003+decoder_num_layers=1', 'lr=0.001+decoder_num_layers=2',
        'lr=0.001+decoder_num_layers=1']


def _argv(out, tiny_syn, steps=300):
    return [str(SCRIPT), 'sweep', str(out), '--grid', 'lr=3e-3,1e-3', '--grid', 'model.decoder_num_layers=2,1',
            '--data-root', str(tiny_syn), '--num-classes', '3', '--batch-size', '3', '--max-steps', str(steps),
            '--ckpt-every', '5', '--num-workers', '0', '--no-progress', '--threads', '1']


def _mtimes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def killed_sweep(tiny_syn, tmp_path_factory):
    "The sweep SIGKILLed once its third run has a checkpoint, then run again to the end."
    out = tmp_path_factory.mktemp('killed') / 'sw'
    proc = subprocess.Popen(_argv(out, tiny_syn), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    third = out / RUNS[2] / 'checkpoints'
    t = time.time()
    while not (third.is_dir() and any(third.glob('step_*.pt'))):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() - t < 900, 'the third run made no checkpoint in 900 s'
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    before = {r: _mtimes(out / r) for r in RUNS[:2]}
    assert not (out / RUNS[2] / 'summary.json').exists(), 'the third run finished before the kill'
    mid = read_sweep(out)
    r = subprocess.run(_argv(out, tiny_syn), env=ENV, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, before, mid, r.stdout


def test_killed_sweep_resumes(killed_sweep):
    out, before, mid, text = killed_sweep
    assert [r['state'] for r in mid['runs']] == ['done', 'done', 'running', 'pending']
    for r in RUNS[:2]: assert _mtimes(out / r) == before[r], f'{r} was touched by the rerun'
    s3 = json.loads((out / RUNS[2] / 'summary.json').read_text())
    assert s3['steps'] == 300 and s3['start_step'] > 0 and 'step_' in s3['resumed_from']
    s4 = json.loads((out / RUNS[3] / 'summary.json').read_text())
    assert s4['steps'] == 300 and s4['start_step'] == 0
    rec = read_sweep(out)
    assert rec['counts'] == {'done': 4} and [r['name'] for r in rec['runs']] == RUNS
    assert rec['grid'] == {'lr': [3e-3, 1e-3], 'model.decoder_num_layers': [2, 1]}
    assert s4['config']['model_overrides']['decoder_num_layers'] == 1 and s4['config']['lr'] == 1e-3
    assert (out / 'feature_cache').is_dir() and '4 done' in text


def test_compare_notebook_on_the_sweep(killed_sweep, tmp_path):
    "papermill nbs/compare.ipynb -p runs SWEEP -p output_dir D: the table equals each summary.json; the PNGs."
    pm = pytest.importorskip('papermill')
    out, *_ = killed_sweep
    cmp = tmp_path / 'cmp'
    pm.execute_notebook(str(ROOT / 'nbs' / 'compare.ipynb'), str(tmp_path / 'out.ipynb'), cwd=str(ROOT),
                        parameters=dict(runs=str(out), output_dir=str(cmp)), kernel_name='python3')
    import csv
    rows = list(csv.DictReader(open(cmp / 'compare.csv')))
    assert [r['run'] for r in rows] == RUNS
    for r in rows:
        s = json.loads((out / r['run'] / 'summary.json').read_text())
        for k in ('top1', 'top5', 'mean_class_accuracy'): assert float(r[k]) == s['val'][k]
        assert float(r['train_time_s']) == s['train_time_s'] and int(r['trainable_params']) > 0
        assert float(r['lr']) == s['config']['lr']
        assert int(r['model.decoder_num_layers']) == s['config']['model_overrides']['decoder_num_layers']
    pngs = {p.name for p in cmp.glob('*.png')}
    assert {'curves.png', 'class_diff.png', 'confusion_diff.png'} <= pngs, pngs
    assert (cmp / 'compare.md').read_text().startswith('| run | lr | model.decoder_num_layers | top1 (%)')


def test_sweep_as_a_slurm_array_through_submitit(tiny_syn, tmp_path):
    "The runs go out as one job array (submitit's local executor standing in for SLURM) and each records itself."
    submitit = pytest.importorskip('submitit')
    out = tmp_path / 'sw'
    ex = submitit.LocalExecutor(folder=out / 'slurm')
    ex.update_parameters(timeout_min=20)
    params = dict(data_root=str(tiny_syn), num_classes=3, batch_size=3, max_steps=4, num_workers=0, progress=False,
                  device='cpu', threads=1)
    rec = run_sweep(out, {'model.decoder_num_layers': [2, 1]}, params, executor=ex)
    assert rec['launcher'] == 'slurm' and [r['state'] for r in rec['runs']] == ['submitted'] * 2
    assert len(rec['jobs']) == 2 and len({j.job_id for j in rec['jobs']}) == 2
    results = [j.result() for j in rec['jobs']]
    assert [r['state'] for r in results] == ['done', 'done']
    assert read_sweep(out)['counts'] == {'done': 2}
    for name in ('decoder_num_layers=2', 'decoder_num_layers=1'):
        assert json.loads((out / name / 'summary.json').read_text())['steps'] == 4
    assert list((out / 'slurm').glob('*_log.out'))


@pytest.mark.parametrize('grid, message', [(['learning_rate=1,2'], 'not a training parameter'),
                                           (['model.depth=1,2'], 'EVLConfig has no field'),
                                           (['model.decoder_num_layers=0,1'], 'decoder_num_layers=0'),
                                           (['lr'], 'NAME=V1,V2')])
def test_bad_grid_is_named(grid, message, tmp_path, capsys):
    argv = ['sweep', str(tmp_path / 'sw'), '--num-classes', '3']
    for g in grid: argv += ['--grid', g]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'sw' / 'sweep.json').exists()


def test_a_failed_run_is_recorded_and_the_others_run(tiny_syn, tmp_path):
    "A run whose folder holds a complete run with other parameters fails; the sweep records it and goes on."
    params = dict(data_root=str(tiny_syn), num_classes=3, batch_size=3, max_steps=2, num_workers=0, progress=False,
                  threads=1, ckpt_every=0)
    out = tmp_path / 'sw'
    run_sweep(out, {'seed': [1, 2]}, params, echo=lambda *a: None)
    rec = run_sweep(out, {'seed': [1, 2]}, dict(params, warmup_steps=1), echo=lambda *a: None)
    assert rec['counts'] == {'failed': 2} and 'other parameters' in rec['runs'][0]['error']
    rec = run_sweep(out, {'seed': [1, 2, 3]}, dict(params, warmup_steps=1), echo=lambda *a: None)
    assert [r['state'] for r in rec['runs']] == ['failed', 'failed', 'done']


def test_sweep_notebook_runs_the_sweep_job(tiny_syn, tmp_path):
    "papermill nbs/sweep.ipynb -p grid {...}: the same job as `evl-nb sweep`; a rerun skips both finished runs."
    pm = pytest.importorskip('papermill')
    out = tmp_path / 'sw'
    params = dict(out_dir=str(out), grid={'model.decoder_num_layers': [2, 1]}, data_root=str(tiny_syn), num_classes=3,
                  batch_size=3, max_steps=2, num_workers=0, ckpt_every=0, threads=1)
    for i in range(2):
        pm.execute_notebook(str(ROOT / 'nbs' / 'sweep.ipynb'), str(tmp_path / f'out{i}.ipynb'), cwd=str(ROOT),
                            parameters=params, kernel_name='python3', progress_bar=False)
        if i == 0: first = _mtimes(out / 'decoder_num_layers=1')
    rec = read_sweep(out)
    assert rec['counts'] == {'done': 2} and [r['name'] for r in rec['runs']] == ['decoder_num_layers=2',
                                                                               'decoder_num_layers=1']
    assert _mtimes(out / 'decoder_num_layers=1') == first
    assert 'complete, skipped' in (tmp_path / 'out1.ipynb').read_text()
