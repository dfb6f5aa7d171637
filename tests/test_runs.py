"""Runs that cannot lose, lie or run foreign code, walked with real `evl-nb` processes and real files: a crafted
checkpoint, two runs on one folder, a truncated newest checkpoint, a resume with a changed lr, bad parameters named
before any data is read, SIGTERM mid-run, and identical commands giving identical weights. The runs that must end
where an undisturbed run ends (a shared folder, beside a CPU-bound process, stopped or SIGTERMed and resumed) all
compare with one uninterrupted 300-step run, `reference`."""
import json, os, pickle, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from evl_nb.checkpoints import read_metrics
from evl_nb.train import cosine_factor

pytestmark = pytest.mark.slow          # real evl-nb training processes, up to 300 steps: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / 'evl-nb'
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
ENV.pop('OMP_NUM_THREADS', None)
REF_STEPS = 300                        # the length of the `reference` run


@pytest.fixture(scope='module')
def reference(tiny_syn, tmp_path_factory):
    "The weights of one undisturbed 300-step run of `_args` (seed 5, 2 threads): what every interrupted run must end with."
    out = tmp_path_factory.mktemp('reference') / 'run'
    r = _run(_args(tiny_syn, out, '--max-steps', REF_STEPS, '--ckpt-every', 100))
    assert r.returncode == 0, r.stderr[-2000:]
    return _weights(out, REF_STEPS)


def _args(tiny_syn, out, *extra, threads=2):
    return ['train', '--dataset', 'synthetic', '--data-root', str(tiny_syn), '--num-classes', '3',
            '--model', 'evl-tiny', '--batch-size', '2', '--num-workers', '0', '--seed', '5', '--threads', str(threads),
            '--no-progress', '--output-dir', str(out), *map(str, extra)]


def _run(argv, timeout=900, **kw):
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def _start(argv):
    return subprocess.Popen([str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _weights(out, step):
    return torch.load(Path(out) / 'checkpoints' / f'step_{step:07d}.pt', weights_only=True)['model']


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


def _train_rows(out):
    return [r for r in read_metrics(Path(out) / 'metrics.csv') if r['kind'] == 'train']


def _wait_for(cond, timeout, what):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.1)


class _Payload:
    "Unpickling this runs `touch marker`: what a stranger's checkpoint could hold."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_crafted_checkpoint_never_runs(tiny_syn, tmp_path):
    out, marker = tmp_path / 'run', tmp_path / 'PWNED'
    (out / 'checkpoints').mkdir(parents=True)
    evil = out / 'checkpoints' / 'step_0000003.pt'
    torch.save(dict(model={}, optimizer={}, scheduler={}, step=3, x=_Payload(marker)), evil)
    r = _run(_args(tiny_syn, out, '--max-steps', 6))
    assert r.returncode == 2, r.stderr[-2000:]
    assert not marker.exists()
    assert 'step_0000003.pt' in r.stderr and 'refuses' in r.stderr and 'Traceback' not in r.stderr
    assert evil.exists()                                   # foreign, not corrupt: left where it is, for the user to see


def test_two_runs_on_one_folder(tiny_syn, reference, tmp_path):
    "The second run exits within seconds naming the holder; the first run's files are an undisturbed run's."
    shared = tmp_path / 'shared'
    first = _start(_args(tiny_syn, shared, '--max-steps', REF_STEPS, '--ckpt-every', 100))
    _wait_for(lambda: (shared / '.evl-nb.lock').exists() and (shared / '.evl-nb.lock').read_text().strip(), 120,
              'the first run to take the lock')
    t0 = time.time()
    second = _run(_args(tiny_syn, shared, '--max-steps', REF_STEPS, '--ckpt-every', 100, '--seed', 1), timeout=120)
    took = time.time() - t0
    assert second.returncode != 0 and f'pid {first.pid}' in second.stderr, second.stderr[-2000:]
    assert took < 30, f'the second run took {took:.0f}s to refuse'
    assert first.wait(timeout=900) == 0, first.stderr.read()[-2000:]
    _assert_same_weights(_weights(shared, REF_STEPS), reference)
    assert [r['step'] for r in _train_rows(shared)] == list(range(1, REF_STEPS + 1))       # every step once
    assert json.loads((shared / 'summary.json').read_text())['config']['seed'] == 5
    assert (shared / '.evl-nb.lock').read_text() == ''                          # released at the end


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(tiny_syn, tmp_path):
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert _run(_args(tiny_syn, full, '--max-steps', 12, '--ckpt-every', 4)).returncode == 0
    r = _run(_args(tiny_syn, part, '--max-steps', 12, '--ckpt-every', 4, '--stop-at-step', 8))
    assert r.returncode == 0, r.stderr[-2000:]
    newest = part / 'checkpoints' / 'step_0000008.pt'
    newest.write_bytes(newest.read_bytes()[:5000])                               # a write cut short
    r = _run(_args(tiny_syn, part, '--max-steps', 12, '--ckpt-every', 4))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'step_0000008.pt' in r.stderr and 'corrupt' in r.stderr
    assert (part / 'checkpoints' / 'step_0000008.pt.corrupt').exists()
    s = json.loads((part / 'summary.json').read_text())
    assert s['start_step'] == 4 and s['resumed_from'].endswith('step_0000004.pt')
    _assert_same_weights(_weights(full, 12), _weights(part, 12))


def test_no_usable_checkpoint_is_one_error(tiny_syn, tmp_path):
    out = tmp_path / 'run'
    (out / 'checkpoints').mkdir(parents=True)
    (out / 'checkpoints' / 'step_0000004.pt').write_bytes(b'not a checkpoint')
    r = _run(_args(tiny_syn, out, '--max-steps', 8))
    assert r.returncode == 2 and 'none of the 1 step checkpoints loads' in r.stderr, r.stderr[-2000:]
    assert not (out / 'metrics.csv').exists()                                    # it did not start over


def test_resume_with_a_changed_lr(tiny_syn, tmp_path):
    out = tmp_path / 'run'
    assert _run(_args(tiny_syn, out, '--max-steps', 8, '--ckpt-every', 4, '--stop-at-step', 4)).returncode == 0
    old = json.loads((out / 'summary.json').read_text())['config']
    old_lr, warmup = old['lr'], old['warmup_steps']
    r = _run(_args(tiny_syn, out, '--max-steps', 8, '--ckpt-every', 4, '--lr', 0.1))
    assert r.returncode == 2 and 'lr: ' in r.stderr and '--allow-changes' in r.stderr, r.stderr[-2000:]
    r = _run(_args(tiny_syn, out, '--max-steps', 8, '--ckpt-every', 4, '--lr', 0.1, '--allow-changes'))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x['step']: x['lr'] for x in _train_rows(out)}
    for step in range(1, 5): assert rows[step] == pytest.approx(old_lr * cosine_factor(step - 1, 8, warmup), rel=1e-5)
    for step in range(5, 9): assert rows[step] == pytest.approx(0.1 * cosine_factor(step - 5, 4), rel=1e-5)   # 0.1's cosine
    s = json.loads((out / 'summary.json').read_text())
    assert s['changes'] == [dict(step=4, param='lr', old=old_lr, new=0.1)] and s['config']['lr'] == 0.1


@pytest.mark.parametrize('argv, name, process', [
    (['--num-frames', '0'], 'num_frames=0', True), (['--num-classes', '0'], 'num_classes=0', False),
    (['--eval-batch-size', '0'], 'eval_batch_size=0', False), (['--max-steps', '-1'], 'max_steps=-1', False)])
def test_bad_counts_are_named_before_any_data_is_read(tmp_path, capsys, argv, name, process):
    "Exit status 2 and one line naming the parameter, nothing written; one case as a real process, the rest here."
    from evl_nb.cli import main
    data = tmp_path / 'data'                                     # synthetic data would be generated here
    argv = ['train', '--dataset', 'synthetic', '--data-root', str(data), '--output-dir', str(tmp_path / 'run'), *argv]
    if process: r = _run(argv); rc, err = r.returncode, r.stderr
    else: rc = main(argv); err = capsys.readouterr().err
    assert rc == 2 and name in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and not data.exists() and not (tmp_path / 'run').exists()


def test_output_paths_under_a_file_are_refused_early(tmp_path, capsys):
    "`evl-nb train` (a real process) and `evl-nb evaluate` (its `main`, in this process): exit 2, one line, no data."
    from evl_nb.cli import main
    f = tmp_path / 'notes.txt'; f.write_text('x')
    r = _run(['train', '--data-root', str(tmp_path / 'data'), '--output-dir', str(f)])
    assert r.returncode == 2 and 'output_dir=' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'data').exists()
    rc = main(['evaluate', '--data-root', str(tmp_path / 'data'), '--output-json', str(f / 'x.json')])
    err = capsys.readouterr().err
    assert rc == 2 and 'output_json=' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'data').exists()


def test_papermill_string_for_a_number_names_the_parameter(tmp_path):
    pm = pytest.importorskip('papermill')
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / 'nbs' / 'train.ipynb'), str(tmp_path / 'out.ipynb'), kernel_name='python3',
                            parameters=dict(lr='x', output_dir=str(tmp_path / 'run')), cwd=str(tmp_path),
                            progress_bar=False)
    assert "lr='x': expected a number" in str(e.value)
    assert not (tmp_path / 'run').exists()                       # refused before the data cell


def test_evaluation_respects_a_running_training(tiny_syn, tmp_path):
    out = tmp_path / 'run'
    first = _start(_args(tiny_syn, out, '--max-steps', 400))
    _wait_for(lambda: (out / '.evl-nb.lock').exists() and (out / '.evl-nb.lock').read_text().strip(), 120, 'the lock')
    r = _run(['evaluate', '--data-root', str(tiny_syn), '--output-json', str(out / 'results.json'), '--no-progress'])
    first.send_signal(signal.SIGTERM); first.wait(timeout=300)
    assert r.returncode == 2 and f'pid {first.pid}' in r.stderr, r.stderr[-2000:]


def test_sigterm_saves_the_step_and_resumes_bit_exactly(tiny_syn, reference, tmp_path):
    part = tmp_path / 'part'
    p = _start(_args(tiny_syn, part, '--max-steps', REF_STEPS, '--ckpt-every', 1000))
    _wait_for(lambda: (part / 'metrics.csv').exists() and len(_train_rows(part)) >= 20, 600, '20 steps')
    p.send_signal(signal.SIGTERM)
    rc, err = p.wait(timeout=120), p.stderr.read()
    assert rc == 143, err[-2000:]
    lines = [l for l in err.splitlines() if 'SIGTERM' in l]
    assert len(lines) == 1 and 'stopped at step' in lines[0], err[-2000:]
    step = int(lines[0].split('stopped at step ')[1].split()[0])
    assert 20 <= step < REF_STEPS and (part / 'checkpoints' / f'step_{step:07d}.pt').exists()
    r = _run(_args(tiny_syn, part, '--max-steps', REF_STEPS, '--ckpt-every', 1000))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((part / 'summary.json').read_text())['start_step'] == step
    _assert_same_weights(_weights(part, REF_STEPS), reference)


def test_the_same_command_twice_at_2_threads_gives_the_same_weights(tiny_syn, reference, tmp_path):
    "The reference's command at 2 threads, run again beside a CPU-bound process: bit-identical weights."
    busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    try: r = _run(_args(tiny_syn, tmp_path / 'a', '--max-steps', REF_STEPS))
    finally: busy.kill(); busy.wait()
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_weights(_weights(tmp_path / 'a', REF_STEPS), reference)


def test_stopped_and_resumed_equals_the_uninterrupted_steps(tiny_syn, reference, tmp_path):
    "Stopped at step 75 of 300 (past the warmup, mid-epoch) and resumed: the reference's weights."
    part = tmp_path / 'part'
    assert _run(_args(tiny_syn, part, '--max-steps', REF_STEPS, '--stop-at-step', 75)).returncode == 0
    r = _run(_args(tiny_syn, part, '--max-steps', REF_STEPS))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((part / 'summary.json').read_text())['start_step'] == 75
    _assert_same_weights(_weights(part, REF_STEPS), reference)


def test_sigkill_at_random_moments_with_device_augmentation_resumes_bit_exactly(tiny_syn, tmp_path):
    """augment_on='device' with the official RandAugment and 2 loader workers (they draw every parameter) on the
    synthetic set's real video files: SIGKILL twice at random steps, resume each time; the weights equal an
    uninterrupted run's."""
    import random
    aug = ['--augment-on', 'device', '--train-aug', json.dumps({'rand_augment': 'rand-m7-n4-mstd0.5-inc1'}),
           '--num-workers', '2', '--max-steps', 60, '--ckpt-every', 4]
    full, part = tmp_path / 'full', tmp_path / 'part'
    rng = random.Random(int(time.time()))
    kills = sorted(rng.sample(range(6, 50), 2))
    for at in kills:
        p = _start(_args(tiny_syn, part, *aug))
        try: _wait_for(lambda: (part / 'metrics.csv').exists() and len(_train_rows(part)) >= at, 600, f'step {at}')
        finally:
            p.send_signal(signal.SIGKILL); p.wait(60)
        assert p.returncode == -signal.SIGKILL, f'finished before the kill at step {at}'
    r = _run(_args(tiny_syn, part, *aug))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((part / 'summary.json').read_text())['start_step'] > 0, kills
    assert _run(_args(tiny_syn, full, *aug)).returncode == 0
    _assert_same_weights(_weights(full, 60), _weights(part, 60))
