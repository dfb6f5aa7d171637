"""A benchmark's results, rendered as markdown, replace its marked section of docs/benchmarks.md.

A section is the text between `<!-- begin NAME -->` and `<!-- end NAME -->`. Each script in this folder takes
`--markdown FILE` (and `--section NAME` to pick another section than its default): after measuring, or with
`--from-json OUT` instead of measuring (the JSON an earlier `--json OUT` run wrote), it renders the results with
the command, the machine and the date they were recorded, and writes them between the markers.
"""
import datetime, json, platform, shlex, sys
from pathlib import Path

SKIP = ('--markdown', '--from-json', '--section', '--json')      # options that do not change what is measured


def markers(name):
    return f'<!-- begin {name} -->', f'<!-- end {name} -->'


def replace_section(path, name, body):
    "Put `body` between the markers of section `name` in the markdown file `path`; a missing marker is an error."
    path = Path(path)
    text = path.read_text()
    begin, end = markers(name)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f'{path}: no section {begin} ... {end}: add both markers where the figures go')
    path.write_text(text[:i + len(begin)] + '\n' + body.strip() + '\n' + text[j:])


def table(header, rows):
    "A markdown table."
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows])


def command(script, argv=None):
    "The command line that measured, without the output options: `python benchmarks/SCRIPT.py ...`."
    argv, out, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for a in argv:
        if skip: skip = False; continue
        if a in SKIP: skip = True; continue
        if a.split('=')[0] in SKIP: continue
        out.append(a)
    return ' '.join(['python', f'benchmarks/{script}.py'] + [shlex.quote(a) for a in out])


def provenance(script, machine, argv=None):
    "What a results JSON records about its run: the command, the machine and today's date."
    return dict(command=command(script, argv), machine=machine, date=datetime.date.today().isoformat())


def stamp(res):
    "The line above a rendered section: the command, the date and the machine of the results."
    parts = [f"`{res['command']}`" if res.get('command') else 'Results',
             f"recorded {res['date']}" if res.get('date') else 'date not recorded',
             f"on {res['machine']}" if res.get('machine') else 'machine not recorded']
    return ', '.join(parts[:2]) + ' ' + parts[2] + ':'


def cpu_name() -> str:
    "The CPU's model name (Linux), else what the platform module knows."
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def load(path):
    "Results written by an earlier `--json` run."
    p = Path(path)
    if not p.is_file(): raise SystemExit(f'--from-json {path}: no such file')
    return json.loads(p.read_text())
