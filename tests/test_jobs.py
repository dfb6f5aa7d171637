"""The job notebooks and the command line are front ends of one job layer (`evl_nb.jobs`, chapter 19_jobs, and the
job functions of the sweep and compare chapters built on it).

Checked on the source with `ast`: a job notebook's code cells define nothing and do not branch (a typed parameter
cell, then calls); what they call comes from the job layer; and a notebook and its `evl-nb` subcommand call the same
job function.

Run: `.venv/bin/python -m pytest tests/test_jobs.py -q`.
"""
import ast, json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
JOB_NOTEBOOKS = ['train.ipynb', 'evaluate.ipynb', 'explore.ipynb', 'prepare.ipynb', 'sweep.ipynb', 'compare.ipynb']
# notebook -> (the cli.py function of its subcommand or None, the job function both call)
FRONT_ENDS = {'train.ipynb': ('train_command', 'train_job'), 'evaluate.ipynb': ('evaluate_command', 'evaluate_job'),
              'prepare.ipynb': ('check_command', 'check_job'), 'explore.ipynb': (None, 'explore_job'),
              'sweep.ipynb': ('sweep_command', 'sweep_job'), 'compare.ipynb': (None, 'compare_job')}
LOGIC = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.If, ast.IfExp, ast.For, ast.While,
         ast.Try, ast.With, ast.comprehension, ast.Match)
JOB_MODULES = {'evl_nb.jobs', 'evl_nb.sweep', 'evl_nb.compare'}     # the job layer: jobs, and the jobs built on it
ALLOWED_MODULES = {'typing', 'pathlib'} | JOB_MODULES


def code_cells(nb: str) -> list[tuple[bool, ast.Module]]:
    "(is the parameter cell, parsed source) of each code cell of `nb`."
    cells = json.loads((NBS / nb).read_text())['cells']
    return [('parameters' in c.get('metadata', {}).get('tags', []), ast.parse(''.join(c['source'])))
            for c in cells if c['cell_type'] == 'code']


def imported(tree: ast.Module) -> dict[str, str]:
    "{local name: module} of every `from M import name` in `tree`."
    return {a.asname or a.name: n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}


def called_names(tree: ast.AST) -> set[str]:
    "The plain names called in `tree` (`f(...)`, not `x.f(...)`)."
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def notebook_jobs(nb: str) -> set[str]:
    "The job-layer functions a job notebook calls."
    cells = [t for _, t in code_cells(nb)]
    names = {k: v for t in cells for k, v in imported(t).items()}
    return {f for t in cells for f in called_names(t) if names.get(f) in JOB_MODULES}


def cli_calls() -> dict[str, set[str]]:
    "{function of evl_nb/cli.py: the job-layer functions it calls}."
    tree = ast.parse((ROOT / 'evl_nb' / 'cli.py').read_text())
    layer = {m.split('.')[1] for m in JOB_MODULES}
    jobs = {k for k, v in imported(tree).items() if (v or '').lstrip('.').removeprefix('evl_nb.') in layer}
    return {f.name: called_names(f) & jobs for f in tree.body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize('nb', JOB_NOTEBOOKS)
def test_job_notebook_defines_nothing_and_does_not_branch(nb):
    bad = [f'{type(n).__name__} at line {n.lineno}' if hasattr(n, 'lineno') else type(n).__name__
           for _, t in code_cells(nb) for n in ast.walk(t) if isinstance(n, LOGIC)]
    assert not bad, f'{nb}: {bad}'


@pytest.mark.parametrize('nb', JOB_NOTEBOOKS)
def test_job_notebook_imports_only_the_job_layer(nb):
    mods = {m for _, t in code_cells(nb) for m in imported(t).values()}
    plain = [a.name for _, t in code_cells(nb) for n in ast.walk(t) if isinstance(n, ast.Import) for a in n.names]
    assert mods <= ALLOWED_MODULES and not plain, (nb, mods, plain)


@pytest.mark.parametrize('nb', JOB_NOTEBOOKS)
def test_job_notebook_passes_every_parameter(nb):
    "The job call names each parameter of the parameter cell (a parameter added to the cell reaches the job)."
    cells = code_cells(nb)
    params = {n.target.id for is_p, t in cells if is_p for n in t.body if isinstance(n, ast.AnnAssign)}
    job = FRONT_ENDS[nb][1]
    calls = [n for is_p, t in cells if not is_p for n in ast.walk(t)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == job]
    assert len(calls) == 1, (nb, job)
    passed = {n.id for k in calls[0].keywords for n in ast.walk(k.value) if isinstance(n, ast.Name)}
    assert params <= passed, (nb, params - passed)


@pytest.mark.parametrize('nb', JOB_NOTEBOOKS)
def test_notebook_and_command_call_the_same_job(nb):
    command, job = FRONT_ENDS[nb]
    assert job in notebook_jobs(nb), (nb, notebook_jobs(nb))
    if command is not None: assert cli_calls()[command] == {job}, (command, cli_calls()[command])


def test_the_checks_see_what_they_look_for():
    "The detectors themselves: a branch, a definition and a job call are found where they are."
    tree = ast.parse('from evl_nb.jobs import train_job\nx = train_job(a=a) if a else None\n[f(i) for i in y]')
    assert {type(n).__name__ for n in ast.walk(tree) if isinstance(n, LOGIC)} == {'IfExp', 'comprehension'}
    assert called_names(tree) == {'train_job', 'f'} and imported(tree) == {'train_job': 'evl_nb.jobs'}
