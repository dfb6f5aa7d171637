"""README.md stays true: every command in its ```bash blocks runs in a test, or is a GPU or cluster command whose
dry-run form runs in one. `COVERAGE` maps each command (a pattern) to the tests that run it; a README command
with no entry, an entry no README command uses, or a named test that does not exist fails here. The cheap runs
live in this file: the make targets with `make -n`, `evl-nb train` with `--print-sbatch`, torchrun's arguments
through `python -m evl_nb.train`'s parser, each papermill `-p` against the notebook's parameters, and the data
commands (SSv2 parts unpacked, `prepare check|scan|store`) on miniature downloads. Also: nothing in the repository
talks about who ran a measurement or why a device was missing, and the benchmark sections of docs/benchmarks.md
can be regenerated from the scripts' JSON."""
import ast, contextlib, importlib.util, io, json, os, re, shlex, subprocess, sys, tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
ENV = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
T = 'tests/test_readme.py::'

# README command (a regex matched from its start) -> the tests that run it or its dry-run form
COVERAGE = {
    r'make test$': [T + 'test_make_targets_dry_run'],                       # the suite itself: CI runs it
    r'make test-fast$': [T + 'test_make_targets_dry_run'],
    r'make demo$': [T + 'test_make_targets_dry_run', 'tests/test_train.py::test_demo_acceptance'],
    r'cd \S+ && cat 20bn-something-something-v2-\?\? \| tar zx$': [T + 'test_readme_data_commands_on_miniatures'],
    r'evl-nb prepare (check|scan|store) ': [
        T + 'test_readme_data_commands_on_miniatures',
        'tests/test_downloads.py::test_prepare_check_reports_missing_duplicated_and_broken',
        'tests/test_cli.py::test_prepare_scan_writes_the_scan_videos_manifest',
        'tests/test_cli.py::test_prepare_store_names_a_broken_file_and_resumes'],
    r'papermill nbs/prepare\.ipynb ': [T + 'test_readme_papermill_parameters',
                                       'tests/test_downloads.py::test_prepare_notebook_shows_the_same_report'],
    r'papermill nbs/train\.ipynb ': [
        T + 'test_readme_papermill_parameters', 'tests/test_downloads.py::test_training_job_on_every_layout',
        'tests/test_papermill.py::test_train_notebook_launches_torchrun_for_two_processes'],
    r'evl-nb train (?!.*--slurm-partition)': [T + 'test_readme_train_commands_dry_run',
                                              'tests/test_runs.py::test_two_runs_on_one_folder',
                                              'tests/test_cli.py::test_the_batch_script_task_trains'],
    r'evl-nb train .*--slurm-partition': [
        T + 'test_readme_train_commands_dry_run', 'tests/test_cli.py::test_print_sbatch_2_nodes_x_8_gpus',
        'tests/test_cli.py::test_submitit_local_job_is_preempted_requeued_and_resumes'],
    r'torchrun .* -m evl_nb\.train ': [T + 'test_readme_torchrun_commands_parse',
                                      'tests/test_papermill.py::test_train_notebook_launches_torchrun_for_two_processes'],
    r'papermill nbs/evaluate\.ipynb ': [T + 'test_readme_papermill_parameters',
                                        'tests/test_papermill.py::test_evaluate_notebook_official_checkpoint'],
    r'evl-nb evaluate ': [T + 'test_readme_evaluate_and_predict_commands_parse',
                          'tests/test_cli.py::test_train_then_predict_real_clips'],
    r'papermill nbs/explore\.ipynb runs/explore\.ipynb$': [T + 'test_readme_explore_opens_on_the_demo_model'],
    r'papermill nbs/explore\.ipynb \S+ -p': [T + 'test_readme_papermill_parameters',
                                             'tests/test_journey.py::test_explore_notebook_on_trainer_checkpoint',
                                             'tests/test_attention.py::test_explore_notebook_runs_on_a_video_file'],
    r'evl-nb predict ': [T + 'test_readme_evaluate_and_predict_commands_parse',
                         'tests/test_cli.py::test_train_then_predict_real_clips'],
    r'evl-nb sweep ': [T + 'test_readme_sweep_commands_plan', 'tests/test_sweep.py::test_killed_sweep_resumes',
                       'tests/test_sweep.py::test_sweep_as_a_slurm_array_through_submitit'],
    r'papermill nbs/compare\.ipynb ': [T + 'test_readme_papermill_parameters',
                                       'tests/test_sweep.py::test_compare_notebook_on_the_sweep'],
}

# Commands whose code has not landed yet (pattern -> the file that brings it): accepted without an entry only
# while the file named here is absent; once it exists they need COVERAGE entries like every other command.
AWAITING = {}


def readme_commands(text: str) -> list[str]:
    "The commands of the ```bash blocks: continuation lines joined, comments and extra spaces dropped."
    cmds = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
            line = re.sub(r'(^|\s)#.*$', '', line).strip()
            if line: cmds.append(' '.join(line.split()))
    return cmds


COMMANDS = readme_commands(README.read_text())


def covering(cmd: str) -> list[str]:
    return [p for p in COVERAGE if re.match(p, cmd)]


def awaited(cmd: str) -> bool:
    return any(re.match(p, cmd) and not (ROOT / f).exists() for p, f in AWAITING.items())


def _test_exists(test_id: str) -> bool:
    "`tests/test_x.py::name`: the file exists and defines a test function `name`."
    path, _, name = test_id.partition('::')
    f = ROOT / path
    if not f.is_file(): return False
    tree = ast.parse(f.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


def commands(pattern: str) -> list[str]:
    return [c for c in COMMANDS if re.match(pattern, c)]


# ---------------------------------------------------------------- the table

def test_readme_parser():
    text = "x\n```bash\nmake a   # comment\nrun --x 1 \\\n    --y 2\n```\n```python\nnot_this()\n```\n"
    assert readme_commands(text) == ['make a', 'run --x 1 --y 2']


def test_readme_has_commands_and_stays_short():
    assert len(COMMANDS) >= 15
    assert len(README.read_text().splitlines()) <= 200


def test_every_readme_command_is_run_by_a_test():
    missing = [c for c in COMMANDS if not covering(c) and not awaited(c)]
    assert missing == [], f'README commands no test runs (add them to COVERAGE in {T[:-2]}): {missing}'


def test_every_named_test_exists():
    absent = sorted({t for tests in COVERAGE.values() for t in tests if not _test_exists(t)})
    assert absent == [], f'COVERAGE names tests that do not exist: {absent}'


def test_every_coverage_entry_is_used():
    stale = [p for p in COVERAGE if not commands(p)]
    assert stale == [], f'COVERAGE entries no README command matches (delete them): {stale}'


def test_awaited_commands_are_still_awaited():
    landed = [f for p, f in AWAITING.items() if (ROOT / f).exists()]
    assert landed == [], f'{landed} exist now: map their README commands in COVERAGE and drop them from AWAITING'


def test_test_times_are_stated_within_their_caps():
    """The test section states the measured times of the two tiers, each before its marker: `make test-fast` at most
    5 minutes, the pytest part of `make test` at most 12 (a slower measurement written in fails here)."""
    text = ' '.join(README.read_text().split())
    fast = re.search(r'`make test-fast` took (\d+) s <!-- fast-time -->', text)
    full = re.search(r'pytest part of `make test` (\d+) s <!-- full-time -->', text)
    assert fast and full, 'the test section lost its measured times'
    assert int(fast[1]) <= 300 and int(full[1]) <= 720, (fast[1], full[1])


# ---------------------------------------------------------------- the cheap runs

def test_make_targets_dry_run():
    "`make -n TARGET` for each README make command: the recipe names the steps the README promises."
    want = {'test': ['nbdev_export', 'nbdev_test', 'pytest'], 'test-fast': ['nbdev_export', "not slow"],
            'demo': ['evl_nb.demo']}
    targets = [c.split()[1] for c in COMMANDS if c.startswith('make ')]
    assert set(targets) == set(want), targets
    for t in targets:
        r = subprocess.run(['make', '-n', t, 'VENV=/nonexistent/venv'], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (t, r.stderr)
        for w in want[t]: assert w in r.stdout, (t, w, r.stdout)


def _cli(argv):
    from evl_nb import cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try: rc = cli.main(argv)
        except SystemExit as e: rc = e.code
    return rc, buf.getvalue()


@pytest.mark.parametrize('cmd', commands(r'evl-nb train '))
def test_readme_train_commands_dry_run(cmd):
    "The GPU and cluster training commands with `--print-sbatch`: options checked, the batch script carries them."
    argv = shlex.split(cmd)[1:]
    rc, out = _cli(argv + ['--print-sbatch'])
    assert rc == 0, out
    srun = [l for l in out.splitlines() if l.startswith('srun ')]
    assert len(srun) == 1, out
    task = shlex.split(srun[0])
    for flag in ('--dataset', '--data-root', '--pretrained', '--output-dir', '--store'):
        if flag in argv: assert task[task.index(flag) + 1] == argv[argv.index(flag) + 1], (flag, srun[0])
    nodes = int(argv[argv.index('--nodes') + 1]) if '--nodes' in argv else 1
    gpus = argv[argv.index('--gpus-per-node') + 1] if '--gpus-per-node' in argv else argv[argv.index('--gpus') + 1]
    assert f'#SBATCH --nodes={nodes}' in out and f'#SBATCH --ntasks-per-node={gpus}' in out, out


@pytest.mark.parametrize('cmd', commands(r'evl-nb (evaluate|predict) '))
def test_readme_evaluate_and_predict_commands_parse(cmd):
    "The evaluation and prediction commands parse as written (every option exists, values of the right type)."
    from evl_nb.cli import build_cli
    argv = shlex.split(cmd)[1:]
    args = vars(build_cli().parse_args(argv))
    assert args['checkpoint'] == argv[argv.index('--checkpoint') + 1]


@pytest.mark.parametrize('cmd', commands(r'evl-nb sweep '))
def test_readme_sweep_commands_plan(cmd, tmp_path):
    "A README sweep parses as written and plans: every grid point is a training job that `job_config` accepts."
    from evl_nb.cli import build_cli
    from evl_nb.slurm import SLURM_OPTIONS
    from evl_nb.sweep import parse_grid, plan_sweep
    a = vars(build_cli().parse_args(shlex.split(cmd)[1:]))
    for k in ['command', 'out_dir', 'gpus'] + [o.name for o in SLURM_OPTIONS]: a.pop(k)
    grid = parse_grid(a.pop('grid'))
    plan = plan_sweep(tmp_path / 'sw', grid, dict(a, data_root=str(tmp_path)))    # the data: a GPU machine's
    n = 1
    for v in grid.values(): n *= len(v)
    assert len(plan['runs']) == n and len({r['output_dir'] for r in plan['runs']}) == n


@pytest.mark.parametrize('cmd', commands(r'torchrun '))
def test_readme_torchrun_commands_parse(cmd):
    "What torchrun runs on each node, `python -m evl_nb.train ARGS`, parses (names and types of every option)."
    from evl_nb.train import build_parser
    argv = shlex.split(cmd)
    args = vars(build_parser().parse_args(argv[argv.index('evl_nb.train') + 1:]))
    assert args['dataset'] in ('k400', 'ssv2') and args['data_root'] and args['output_dir']


def _papermill_value(v: str):
    "A `-p` value as papermill's command line reads it."
    for conv in (int, float):
        try: return conv(v)
        except ValueError: pass
    return {'True': True, 'False': False, 'None': None}.get(v, v)


def _fits(value, type_name: str) -> bool:
    kinds = {'int': int, 'float': (int, float), 'str': str, 'bool': bool, 'tuple': tuple, 'dict': dict, 'list': list}
    allowed = [kinds[k] for k in re.findall(r'\b(int|float|str|bool|tuple|dict|list)\b', type_name or '')]
    if value is None: return 'Optional' in (type_name or '') or not allowed
    if not allowed: return True
    if isinstance(value, bool) and bool not in allowed: return False
    return any(isinstance(value, a) for a in allowed)


@pytest.mark.parametrize('cmd', [c for c in commands(r'papermill ') if not awaited(c)])
def test_readme_papermill_parameters(cmd):
    "Every `-p NAME VALUE` of a README papermill command is a parameter of that notebook, of the declared type."
    pm = pytest.importorskip('papermill')
    argv = shlex.split(cmd)
    nb = ROOT / argv[1]
    assert nb.is_file(), nb
    params = pm.inspect_notebook(str(nb))
    given = [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == '-p']
    assert len(given) == argv.count('-p')
    for name, raw in given:
        assert name in params, f'{nb.name} has no parameter {name!r}'
        v = _papermill_value(raw)
        assert _fits(v, params[name]['inferred_type_name']), (name, raw, params[name]['inferred_type_name'])


def _ssv2_parts(root: Path):
    "SSv2 as it is downloaded: the videos folder as split tar.gz parts, the labels folder beside them."
    videos = root / '20bn-something-something-v2'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar: tar.add(videos, arcname=videos.name)
    data = buf.getvalue()
    half = len(data) // 2
    for i, part in enumerate((data[:half], data[half:])): (root / f'{videos.name}-{i:02d}').write_bytes(part)
    for f in videos.iterdir(): f.unlink()
    videos.rmdir()


def test_readme_data_commands_on_miniatures(tmp_path, monkeypatch):
    """The README's data commands in order, on miniatures of the K400 and SSv2 downloads (`/data/k400`,
    `/data/ssv2` under a temporary folder, 16 workers cut to 1): the SSv2 parts unpack into a layout the doctor
    reads, and `prepare check`, `scan` and `store` succeed."""
    from evl_nb.synthetic import make_synthetic_dataset
    from miniatures import make_layout
    syn = make_synthetic_dataset(tmp_path / 'syn', num_classes=3, train_per_class=2, val_per_class=1,
                                 num_frames=(8, 8), progress=False)
    data = tmp_path / 'data'; data.mkdir()
    k400, ssv2 = data / 'k400', data / 'ssv2'
    make_layout(syn, tmp_path, 'k400-cvdfoundation')[1].rename(k400)
    make_layout(syn, tmp_path, 'ssv2-current')[1].rename(ssv2)
    _ssv2_parts(ssv2)
    work = tmp_path / 'work'; work.mkdir()
    monkeypatch.chdir(work)
    ran = []
    for cmd in COMMANDS:
        if not (cmd.startswith('cd ') or cmd.startswith('evl-nb prepare ')): continue
        cmd = re.sub(r'(?<=\s)/data/', f'{data}/', cmd).replace('--workers 16', '--workers 1')
        if cmd.startswith('cd '):
            r = subprocess.run(['bash', '-c', cmd], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (cmd, r.stderr)
        else:
            rc, out = _cli(shlex.split(cmd)[1:] + ['--no-progress'])
            assert rc == 0, (cmd, out)
        ran.append(cmd)
    assert (ssv2 / '20bn-something-something-v2').is_dir()
    assert any('prepare check --dataset ssv2' in c for c in ran) and any('prepare store' in c for c in ran), ran
    assert (work / 'k400_check.json').is_file() and (work / 'k400_manifest.csv').is_file()
    assert (data / 'k400_store' / 'manifest.csv').is_file()


@pytest.mark.slow
def test_readme_explore_opens_on_the_demo_model(tmp_path):
    "`papermill nbs/explore.ipynb runs/explore.ipynb` as written, in a folder where `make demo` left a model."
    pytest.importorskip('papermill')
    from evl_nb.synthetic import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / 'syn', num_classes=3, train_per_class=2, val_per_class=1, num_frames=(8, 8),
                           ssv2=False, progress=False)
    demo = tmp_path / 'runs' / 'demo' / 'evl'
    rc, out = _cli(['train', '--data-root', str(tmp_path / 'syn'), '--num-classes', '3', '--batch-size', '2',
                    '--max-steps', '1', '--num-workers', '0', '--output-dir', str(demo), '--no-progress'])
    assert rc == 0, out
    (cmd,) = commands(r'papermill nbs/explore\.ipynb runs/explore\.ipynb$')
    argv = shlex.split(cmd)
    env = dict(ENV, PYTHONPATH=str(ROOT), EVL_NB_DATA=str(tmp_path / 'cache'))
    env.pop('IN_TEST', None)
    r = subprocess.run([sys.executable, '-m', 'papermill', str(ROOT / argv[1]), argv[2], '--no-progress-bar'],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    nb = json.loads((tmp_path / argv[2]).read_text())
    text = ''.join(''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', []))
    assert 'runs/demo/evl' in text and 'untrained evl-tiny' not in text
    assert not (tmp_path / 'cache' / 'evl').exists()                  # found make demo's model, trained nothing


# ---------------------------------------------------------------- the words and the benchmark sections

# Text about the people or sessions behind a measurement, or why a device was missing, instead of the software and
# hardware. PHRASES_PENDING: files outside this file's owner's reach that still hold such text; each must still
# match (test_no_stale_phrase_exceptions), so rewording one means deleting it here.
PHRASES = [r'\blent\b', r'\bengineers?\b', r'this (session|task|submission)\b', r"chapter's session",
           r'\bedited by (another|a|the) helper', r'\bhelpers? (were|was) (being )?editing',
           r'no (gpu|cuda device|real cluster) was (available|lent|given)', r'not available offline here']
PHRASES_PENDING = set()


def _texts():
    globs = ['README.md', 'docs/**/*.md', 'benchmarks/*', 'tests/*.py', 'nbs/*.ipynb', 'evl_nb/*.py', 'Makefile',
             'setup.py', 'settings.ini', '.ci/*']
    me = Path(__file__).resolve()
    for g in globs:
        for f in sorted(ROOT.glob(g)):
            if f.is_file() and f.resolve() != me: yield f.relative_to(ROOT).as_posix(), f.read_text(errors='replace')


def _phrases(text):
    return [m.group(0) for p in PHRASES for m in re.finditer(p, text, re.I)]


def test_nothing_talks_about_who_measured_or_why_a_device_was_missing():
    found = {f: _phrases(t) for f, t in _texts() if f not in PHRASES_PENDING}
    assert {f: v for f, v in found.items() if v} == {}


def test_no_stale_phrase_exceptions():
    texts = dict(_texts())
    assert [f for f in PHRASES_PENDING if not _phrases(texts.get(f, ''))] == []


def test_phrase_detector():
    assert _phrases('not measured: no GPU was lent to this task') and _phrases('shared with three other engineers')
    assert not _phrases('Distributed helpers; Topic :: Scientific/Engineering; measured on a 2-core CPU')


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_sections_regenerate_from_json(tmp_path):
    "docs/benchmarks.md has each script's default section; `--from-json` rewrites one and leaves the rest."
    doc = ROOT / 'docs' / 'benchmarks.md'
    text = doc.read_text()
    for name in ('augment-split', 'augment-fidelity', 'model-cpu-fp32', 'model-cpu-bf16', 'model-cuda-bf16'):
        assert f'<!-- begin {name} -->' in text and f'<!-- end {name} -->' in text, name
    copy = tmp_path / 'benchmarks.md'
    copy.write_text(text)
    res = dict(store_worker_pil=30.0, store_worker_device=150.0, device_augment_cpu=60.0,
               dataloader_2_workers_pil=50.0, dataloader_2_workers_device=75.0, main_threads=2,
               command='python benchmarks/data_throughput.py --augment-only', machine='Test CPU, 2 cores',
               date='2030-01-02')
    (tmp_path / 'split.json').write_text(json.dumps(res))
    mod = _script('data_throughput')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, 'argv', ['data_throughput.py', '--from-json', str(tmp_path / 'split.json'),
                                 '--markdown', str(copy)])
        mod.main()
    new = copy.read_text()
    section = new.split('<!-- begin augment-split -->')[1].split('<!-- end augment-split -->')[0]
    assert 'recorded 2030-01-02 on Test CPU, 2 cores' in section and '| 150.0 (5.00x) |' in section
    assert 'not measured' in section                                                   # no CUDA rate in the JSON
    outside = lambda t: t.split('<!-- begin augment-split -->')[0] + t.split('<!-- end augment-split -->')[1]
    assert outside(new) == outside(text)
