"""The `evl-nb` console script: help of every subcommand, options equal to the notebooks' parameters, train ->
predict on real clips (a broken file skipped), SLURM submission through submitit's local executor with a preemption,
the batch script of a 2-node x 8-GPU job, and `prepare scan` against `scan_videos`."""
import argparse, ast, contextlib, csv, io, json, os, shlex, signal, subprocess, sys, time
from unittest import mock
from pathlib import Path

import pytest

from conftest import fixture_path
from evl_nb import cli, jobs
from evl_nb.slurm import SLURM_OPTIONS, SubmititTask
from evl_nb.video import is_risky_format, scan_videos

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / 'evl-nb'
ENV = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')


def _main(argv):
    "Run `evl-nb argv` in this process; (exit status, stdout)."
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try: rc = cli.main(argv)
        except SystemExit as e: rc = e.code
    return rc, buf.getvalue()


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    from evl_nb.synthetic import make_synthetic_dataset
    d = tmp_path_factory.mktemp('cli')
    make_synthetic_dataset(d / 'syn', num_classes=3, train_per_class=3, val_per_class=2, num_frames=(8, 8), ssv2=False,
                           progress=False)
    return d


def test_installed_script_help():
    assert SCRIPT.exists(), f'{SCRIPT} missing: pip install -e . installs the evl-nb console script'
    r = subprocess.run([str(SCRIPT), '--help'], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    for c in ('train', 'evaluate', 'predict', 'prepare', 'demo'): assert c in r.stdout


@pytest.mark.parametrize('argv, expect', [
    (['train'], ['--data-root', '--slurm-partition', '--gpus-per-node', '--print-sbatch']),
    (['evaluate'], ['--checkpoint', '--class-list', '--eval-views', '--output-json']),
    (['predict'], ['VIDEO', '--checkpoint', '--preset', '--views', '--top', '--json', '--attention', '--class-list']),
    (['prepare'], ['scan', 'reencode']),
    (['prepare', 'scan'], ['ROOT', '--manifest', '--workers']),
    (['prepare', 'reencode'], ['SRC', '--out-dir', '--short-side', '--keyint', '--workers', '--overwrite']),
    (['demo'], ['--output-dir', '--quick']),
])
def test_subcommand_help(argv, expect):
    if argv == ['demo']:       # `evl-nb demo` runs `python -m evl_nb.demo` in its own process
        r = subprocess.run([str(SCRIPT), 'demo', '--help'], capture_output=True, text=True, env=ENV, timeout=300)
        rc, out = r.returncode, r.stdout
    else: rc, out = _main(argv + ['--help'])
    assert rc == 0
    for e in expect: assert e in out, (argv, e)


def _cli_options(add):
    "{name: (default, help)} of a subcommand's options, read from its parser."
    p = add(argparse.ArgumentParser().add_subparsers())
    defaults = vars(p.parse_args([]))
    with mock.patch.dict(os.environ, {'COLUMNS': '10000'}):   # no wrapping (argparse breaks 'micro-batch' at the hyphen)
        text = ' '.join(p.format_help().split())
    return defaults, text


def _compare(nb_name, add, library_options, cli_only):
    nb = pm_inspect(nb_name)
    defaults, text = _cli_options(add)
    mine = {k: v for k, v in defaults.items() if k not in cli_only}
    missing, extra = sorted(set(nb) - set(mine)), sorted(set(mine) - set(nb))
    differ = {k: (nb[k]['default'], mine[k]) for k in nb if k in mine and ast.literal_eval(nb[k]['default']) != mine[k]}
    for k, v in nb.items():                               # the notebook comment is the option's help, word for word
        assert ' '.join(v['help'].split()) in text, (k, v['help'])
        if k in library_options: assert library_options[k].help == v['help'], k
    return missing, extra, differ


def pm_inspect(nb):
    pm = pytest.importorskip('papermill')
    return pm.inspect_notebook(str(ROOT / 'nbs' / nb))


def test_evaluate_options_are_the_notebook_parameters():
    missing, extra, differ = _compare('evaluate.ipynb', cli.add_evaluate_parser, {o.name: o for o in jobs.EVALUATE_OPTIONS},
                                      {'progress'})
    assert (missing, extra, differ) == ([], [], {})


def test_sweep_options_are_the_notebook_parameters():
    """nbs/sweep.ipynb's parameters are `evl-nb sweep`'s options and arguments, with equal defaults (the grid
    aside: a dict there, repeated --grid flags here); a training option keeps TRAIN_OPTIONS's help."""
    from evl_nb.config import TRAIN_OPTIONS
    nb = pm_inspect('sweep.ipynb')
    p = cli.add_sweep_parser(argparse.ArgumentParser().add_subparsers())
    mine = vars(p.parse_args(['OUT', '--grid', 'lr=1']))
    mine = {k: v for k, v in mine.items() if k not in ('progress', 'grid', 'out_dir')}
    assert sorted(set(nb) - set(mine) - {'grid', 'out_dir'}) == [] and sorted(set(mine) - set(nb)) == []
    differ = {k: (nb[k]['default'], mine[k]) for k in mine if ast.literal_eval(nb[k]['default']) != mine[k]}
    assert differ == {}, differ
    for k in set(nb) & set(TRAIN_OPTIONS) - {'gpus'}: assert TRAIN_OPTIONS[k].help == nb[k]['help'], k


def test_train_options_cover_the_notebook_parameters():
    "Every nbs/train.ipynb parameter is an `evl-nb train` option with the help of evl_nb.config.TRAIN_OPTIONS."
    from evl_nb.config import TRAIN_OPTIONS
    cli_only = {'print_sbatch', 'summary_json', 'progress'} | ({o.name for o in SLURM_OPTIONS} - set(pm_inspect('train.ipynb')))
    missing, extra, differ = _compare('train.ipynb', cli.add_train_parser, TRAIN_OPTIONS, cli_only)
    assert missing == []
    assert set(extra) <= set(TRAIN_OPTIONS)               # the rest of TRAIN_OPTIONS (device, weight_decay, ...)
    assert differ == {}, differ


def test_train_options_are_exactly_the_notebook_parameters():
    from evl_nb.config import TRAIN_OPTIONS
    cli_only = {'print_sbatch', 'summary_json', 'progress'} | ({o.name for o in SLURM_OPTIONS} - set(pm_inspect('train.ipynb')))
    assert _compare('train.ipynb', cli.add_train_parser, TRAIN_OPTIONS, cli_only) == ([], [], {})


def test_print_sbatch_2_nodes_x_8_gpus():
    rc, out = _main(['train', '--dataset', 'k400', '--data-root', '/data/k400', '--pretrained', 'openai',
                     '--output-dir', '/shared/runs/k400', '--slurm-partition', 'gpu', '--nodes', '2', '--gpus-per-node', '8',
                     '--slurm-time', '2-00:00:00', '--slurm-account', 'vision', '--print-sbatch'])
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == '#!/bin/bash'
    head = [l[len('#SBATCH '):] for l in lines if l.startswith('#SBATCH ')]
    for h in ('--partition=gpu', '--account=vision', '--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8',
              '--time=2-00:00:00', '--output=/shared/runs/k400/slurm/%j.out', '--requeue'):
        assert h in head, h
    srun = [l for l in lines if l.startswith('srun ')]
    assert len(srun) == 1
    args = shlex.split(srun[0])
    i = args.index('slurm-task')
    assert args[i - 2:i] == ['-m', 'evl_nb.cli']
    assert args[i + 1:] == ['--dataset', 'k400', '--data-root', '/data/k400', '--pretrained', 'openai',
                            '--output-dir', '/shared/runs/k400']
    assert any(l.startswith('export MASTER_ADDR=') for l in lines) and any(l.startswith('export MASTER_PORT=') for l in lines)


def test_the_batch_script_task_trains(syn, tmp_path):
    "The srun payload of --print-sbatch, run as SLURM task 0 of 1, trains and writes summary.json."
    out = tmp_path / 'run'
    rc, text = _main(['train', '--data-root', str(syn / 'syn'), '--num-classes', '3', '--batch-size', '2', '--max-steps', '2',
                      '--num-workers', '0', '--output-dir', str(out), '--nodes', '1', '--gpus', '1', '--print-sbatch'])
    args = shlex.split([l for l in text.splitlines() if l.startswith('srun ')][0])
    payload = args[args.index(sys.executable):]
    env = dict(ENV, SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NTASKS='1', SLURM_JOB_NUM_NODES='1', SLURM_JOB_ID='42',
               SLURM_JOB_NODELIST='localhost')
    r = subprocess.run(payload, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['steps'] == 2 and s['world_size'] == 1


def test_submitit_local_job_is_preempted_requeued_and_resumes(syn, tmp_path):
    "A job through submitit's local executor gets the preemption signal mid-run, requeues itself and finishes."
    submitit = pytest.importorskip('submitit')
    out = tmp_path / 'run'
    params = dict(dataset='synthetic', data_root=str(syn / 'syn'), num_classes=3, batch_size=2, max_steps=30, ckpt_every=2,
                  num_workers=0, output_dir=str(out), progress=False, device='cpu')
    ex = submitit.LocalExecutor(folder=out / 'slurm')
    ex.update_parameters(timeout_min=10)
    job = jobs.submit_train(params, executor=ex)
    first = out / 'checkpoints' / 'step_0000002.pt'
    t = time.time()
    while not first.exists():
        assert job.state == 'RUNNING', job.stderr()
        assert time.time() - t < 300, 'no checkpoint after 300 s'
        time.sleep(0.05)
    assert not (out / 'summary.json').exists()
    controller = job._process.pid                        # the local executor's controller; its child is the task
    task = int(Path(f'/proc/{controller}/task/{controller}/children').read_text().split()[0])
    os.kill(task, signal.SIGUSR2)                        # what SLURM sends before preempting or at the time limit
    r = job.result()
    assert 'Requeued job' in job.stderr() or 'Requeued job' in job.stdout()
    assert r['steps'] == 30 and 2 <= r['start_step'] < 30 and 'step_' in r['resumed_from']
    s = json.loads((out / 'summary.json').read_text())
    assert s['steps'] == 30 and s['resumed_from'] == r['resumed_from']
    assert list((out / 'slurm').glob('*_log.out')), 'submitit logs are not in output_dir/slurm'


def test_train_then_predict_real_clips(syn, tmp_path):
    clips = [fixture_path('videos', n) for n in ('carphone_pristine.mp4', 'mmaction2_basketball.mp4')]
    out = tmp_path / 'run'
    rc, _ = _main(['train', '--data-root', str(syn / 'syn'), '--num-classes', '3', '--batch-size', '2', '--max-steps', '2',
                   '--num-workers', '0', '--output-dir', str(out)])
    assert rc == 0 and (out / 'summary.json').exists()
    ckpt = out / 'checkpoints' / 'best.pt'
    rc, text = _main(['evaluate', '--checkpoint', str(ckpt), '--data-root', str(syn / 'syn'), '--eval-views', '1x1',
                      '--num-workers', '0', '--output-json', str(tmp_path / 'eval.json'), '--no-progress'])
    assert rc == 0 and 'top-1' in text
    assert json.loads((tmp_path / 'eval.json').read_text())['num_samples'] == 6     # 3 classes x 2 validation clips
    broken = tmp_path / 'broken.mp4'
    broken.write_bytes(clips[0].read_bytes()[:4000])     # a truncated download
    js, gif = tmp_path / 'preds.json', tmp_path / 'att.gif'
    r = subprocess.run([str(SCRIPT), 'predict', str(clips[0]), str(broken), str(clips[1]), '--checkpoint', str(ckpt),
                        '--views', '1x1', '--json', str(js), '--attention', str(gif)],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(js.read_text())
    import torch
    classes = torch.load(ckpt, weights_only=False)['classes']
    assert len(classes) == 3
    assert [p['video'] for p in res['predictions']] == [str(clips[0]), str(clips[1])]
    assert [s['video'] for s in res['skipped']] == [str(broken)]
    assert str(broken) in r.stderr                        # named when it is skipped
    for p in res['predictions']:
        assert [t['rank'] for t in p['top']] == [1, 2, 3]   # 3 classes: the top-5 is all of them
        probs = [t['probability'] for t in p['top']]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        for t in p['top']:
            assert f"{100 * t['probability']:5.1f}%  {t['name']}" in r.stdout
            assert t['name'] in classes
    assert f'skipped {broken}' in r.stdout
    assert sorted(p.name for p in tmp_path.glob('att_*.gif')) == sorted(f'att_{c.stem}.gif' for c in clips)
    assert all(p.read_bytes()[:6] == b'GIF89a' for p in tmp_path.glob('att_*.gif'))


def test_predict_checks_each_video_once(syn, tmp_path, monkeypatch):
    """`evl-nb predict --attention`: each video's check (a sequential decode and decord's probes, most of the time on
    a short clip) runs once, shared by the predictions and the animation."""
    from evl_nb import attention, data
    from evl_nb.video import check_video
    out = tmp_path / 'run'
    assert _main(['train', '--data-root', str(syn / 'syn'), '--num-classes', '3', '--batch-size', '2', '--max-steps', '1',
                  '--num-workers', '0', '--output-dir', str(out)])[0] == 0
    seen = []
    def counted(path, *a, **kw): seen.append(str(path)); return check_video(path, *a, **kw)
    monkeypatch.setattr(data, 'check_video', counted); monkeypatch.setattr(attention, 'check_video', counted)
    clips = [str(p) for p in sorted((syn / 'syn' / 'videos' / 'val').rglob('*.mp4'))[:2]]
    rc, _ = _main(['predict', *clips, '--checkpoint', str(out / 'checkpoints' / 'best.pt'), '--views', '1x1',
                   '--attention', str(tmp_path / 'att.gif')])
    assert rc == 0 and len(list(tmp_path.glob('att_*.gif'))) == 2
    assert sorted(seen) == sorted(clips), seen


def test_predict_preset_mismatch_is_a_clear_error(syn, tmp_path):
    out = tmp_path / 'run'
    _main(['train', '--data-root', str(syn / 'syn'), '--num-classes', '3', '--batch-size', '2', '--max-steps', '1',
           '--num-workers', '0', '--output-dir', str(out)])
    clip = fixture_path('videos', 'carphone_pristine.mp4')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(['predict', str(clip), '--checkpoint', str(out / 'checkpoints' / 'best.pt'), '--preset', 'evl-b16-8f'])
    assert rc == 2 and 'evl-nb predict: error: --checkpoint does not fit --preset' in err.getvalue()
    assert 'decoder_qkv_dim: 128 in the checkpoint, 768 in the preset' in err.getvalue()   # names what differs


def test_prepare_scan_writes_the_scan_videos_manifest(tmp_path):
    "The CLI's manifest is `scan_videos`'s, on three of the fixture clips (mp4 h264 at two sizes, avi)."
    videos = tmp_path / 'videos'; videos.mkdir()
    for name in ('carphone_pristine.mp4', 'bikes.mp4', 'mmaction2_test_eyemakeup.avi'):
        (videos / name).write_bytes(fixture_path('videos', name).read_bytes())
    rc, out = _main(['prepare', 'scan', str(videos), '--manifest', str(tmp_path / 'cli.csv'), '--workers', '2',
                     '--no-progress'])
    assert rc == 0 and 'manifest' in out
    scan_videos(videos, manifest=tmp_path / 'lib.csv', num_workers=1, progress=False)
    a, b = (list(csv.DictReader(open(tmp_path / f))) for f in ('cli.csv', 'lib.csv'))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        if is_risky_format(x['path'], x['codec']): x.pop('message'); y.pop('message')   # decord's seek there is intermittent
        assert x == y


def test_prepare_reencode_resumes(tmp_path):
    clip = fixture_path('videos', 'carphone_pristine.mp4')
    argv = ['prepare', 'reencode', str(clip), '--out-dir', str(tmp_path / 'out'), '--short-side', '64', '--workers', '1',
            '--no-progress']
    rc, out = _main(argv)
    assert rc == 0 and 're-encoded 1 of 1' in out
    from evl_nb.video import check_video
    info = check_video(tmp_path / 'out' / 'carphone_pristine.mp4')
    assert info.ok and min(info.width, info.height) == 64 and info.frames == check_video(clip).frames
    rc, out = _main(argv)                                 # a second run finds the file written and skips it
    assert rc == 0 and 're-encoded 0 of 1' in out and '(1 already there)' in out


def test_prepare_store_names_a_broken_file_and_resumes(tmp_path):
    clip = fixture_path('videos', 'carphone_pristine.mp4')
    src = tmp_path / 'videos'; src.mkdir()
    (src / clip.name).symlink_to(clip)
    (src / 'broken.mp4').write_bytes(clip.read_bytes()[:3000])
    argv = ['prepare', 'store', str(src), '--out-dir', str(tmp_path / 'store'), '--workers', '1', '--no-progress']
    rc, out = _main(argv)
    assert rc == 0 and '2 videos, 1 converted, 0 already there, 1 failed' in out and 'broken.mp4' in out
    from evl_nb.store import ClipStore
    st = ClipStore(tmp_path / 'store')
    assert st.info(src / clip.name).frames > 0 and st.info(src / 'broken.mp4').error
    rc, out = _main(argv)                                 # a rerun converts nothing again
    assert rc == 0 and '1 already there' in out


def _fake_slurm(tmp_path):
    "A folder with stand-ins for sbatch (copies the batch file to $SBATCH_COPY, prints a job id) and srun."
    bin_dir = tmp_path / 'bin'; bin_dir.mkdir()
    (bin_dir / 'sbatch').write_text('#!/bin/bash\ncp "$1" "$SBATCH_COPY"\necho "Submitted batch job 4242"\n')
    (bin_dir / 'srun').write_text('#!/bin/bash\nexit 0\n')
    for f in bin_dir.iterdir(): f.chmod(0o755)
    return bin_dir


def test_slurm_submission_through_sbatch(tmp_path):
    "`--slurm-partition` hands submitit's batch file to sbatch: 2 nodes x 8 tasks, USR2 before the limit, logs in output_dir."
    pytest.importorskip('submitit')
    bin_dir = _fake_slurm(tmp_path)
    out, copy = tmp_path / 'run', tmp_path / 'job.sbatch'
    env = dict(ENV, PATH=f"{bin_dir}:{ENV['PATH']}", SBATCH_COPY=str(copy))
    r = subprocess.run([str(SCRIPT), 'train', '--output-dir', str(out), '--max-steps', '5', '--slurm-partition', 'gpu',
                        '--nodes', '2', '--gpus-per-node', '8', '--slurm-time', '2:00:00', '--slurm-account', 'proj'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'submitted SLURM job 4242: 2 node(s) x 8 GPU(s)' in r.stdout
    head = [l[len('#SBATCH '):] for l in copy.read_text().splitlines() if l.startswith('#SBATCH ')]
    for h in ('--partition=gpu', '--account=proj', '--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8', '--time=120',
              '--signal=USR2@120', f'--output={out}/slurm/%j/%j_0_log.out'):
        assert h in head, (h, head)
    import pickle
    job = pickle.loads(next((out / 'slurm').rglob('*_submitted.pkl')).read_bytes())
    assert isinstance(job.function, SubmititTask) and job.function.params['max_steps'] == 5


def test_train_notebook_submits_with_slurm_partition(syn, tmp_path, monkeypatch):
    "papermill nbs/train.ipynb -p slurm_partition gpu -p nodes 2 -p gpus 8: the same job goes to sbatch, nothing trains here."
    pm = pytest.importorskip('papermill'); pytest.importorskip('submitit')
    monkeypatch.setenv('PATH', f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}")
    monkeypatch.setenv('SBATCH_COPY', str(tmp_path / 'job.sbatch'))
    out = tmp_path / 'run'
    pm.execute_notebook(str(ROOT / 'nbs' / 'train.ipynb'), str(tmp_path / 'out.ipynb'), cwd=str(tmp_path), progress_bar=False,
                        kernel_name='python3', parameters=dict(data_root=str(syn / 'syn'), num_classes=3, max_steps=4,
                                                               output_dir=str(out), slurm_partition='gpu', nodes=2, gpus=8))
    head = (tmp_path / 'job.sbatch').read_text()
    assert '#SBATCH --nodes=2' in head and '#SBATCH --ntasks-per-node=8' in head and '#SBATCH --partition=gpu' in head
    assert 'submitted SLURM job 4242' in (tmp_path / 'out.ipynb').read_text()
    assert not (out / 'checkpoints').exists()
