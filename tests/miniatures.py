"""Miniatures of the K400 and SSv2 downloads as they unpack, made of the synthetic set's real tiny videos: one builder
per layout `evl_nb.data.resolve_layout` knows (used by tests/test_layouts.py and tests/test_downloads.py)."""
import csv, json, shutil
from pathlib import Path

SPLITS = ('train', 'val')


def k400_rows(syn, split):
    "(label, file stem) of the synthetic K400 CSV of `split`."
    with open(syn[f'{split}_csv'], newline='') as f:
        return [(r['label'], f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}")
                for r in csv.DictReader(f)]


def k400_file(syn, stem):
    return next(Path(syn['videos']).rglob(f'{stem}.mp4'))


def ssv2_items(syn, split):
    return json.loads(Path(syn['ssv2_train' if split == 'train' else 'ssv2_val']).read_text())


def ssv2_label(syn, item):
    labels = json.loads(Path(syn['ssv2_labels']).read_text())
    return int(labels[item['template'].replace('[', '').replace(']', '')])


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True); shutil.copy(src, dst)


def _ssv2_json_layout(syn, root, ann_dir, names, vid_dir):
    "SSv2 JSONs named `names[kind]` in `ann_dir`, videos `<id>.webm` in `vid_dir`."
    for kind, key in (('labels', 'ssv2_labels'), ('train', 'ssv2_train'), ('validation', 'ssv2_val')):
        _copy(syn[key], ann_dir / names(kind))
    for split in SPLITS:
        for it in ssv2_items(syn, split): _copy(Path(syn['ssv2_videos']) / f"{it['id']}.webm", vid_dir / f"{it['id']}.webm")


def _ssv2_20bn(syn, root, sub=''):
    _ssv2_json_layout(syn, root, root / sub, lambda k: f'something-something-v2-{k}.json',
                      root / '20bn-something-something-v2')


def _ssv2_current(syn, root):
    _ssv2_json_layout(syn, root, root / 'labels', lambda k: f'{k}.json', root / '20bn-something-something-v2')


def _ssv2_flat(syn, root):
    _ssv2_json_layout(syn, root, root, lambda k: f'something-something-v2-{k}.json', root)


def _ssv2_mmaction2(syn, root):
    for split in SPLITS:
        lines = []
        for it in ssv2_items(syn, split):
            _copy(Path(syn['ssv2_videos']) / f"{it['id']}.webm", root / 'videos' / f"{it['id']}.webm")
            lines.append(f"{it['id']}.webm {ssv2_label(syn, it)}\n")
        (root / f'sthv2_{split}_list_videos.txt').write_text(''.join(lines))


def _k400_cvdf(syn, root):
    for split in SPLITS:
        _copy(syn[f'{split}_csv'], root / 'annotations' / f'{split}.csv')
        for _, stem in k400_rows(syn, split): _copy(k400_file(syn, stem), root / split / f'{stem}.mp4')


def _k400_mmaction2(syn, root):
    names = sorted(syn['class_names'])
    for split in SPLITS:
        lines = []
        for lab, stem in k400_rows(syn, split):
            rel = f"{lab.replace(' ', '_')}/{stem}.mp4"
            _copy(k400_file(syn, stem), root / f'videos_{split}' / rel)
            lines.append(f'{rel} {names.index(lab)}\n')
        (root / f'kinetics400_{split}_list_videos.txt').write_text(''.join(lines))


def _k400_folders(syn, root):
    for split in SPLITS:
        for lab, stem in k400_rows(syn, split): _copy(k400_file(syn, stem), root / split / lab / f'{stem}.mp4')


LAYOUTS = {  # id: (dataset, builder, the layout name resolve_layout gives, video folder of a split)
    'ssv2-20bn-root': ('ssv2', _ssv2_20bn, '20bn', lambda s: '20bn-something-something-v2'),
    'ssv2-20bn-label': ('ssv2', lambda y, r: _ssv2_20bn(y, r, 'label'), '20bn', lambda s: '20bn-something-something-v2'),
    'ssv2-20bn-labels': ('ssv2', lambda y, r: _ssv2_20bn(y, r, 'labels'), '20bn', lambda s: '20bn-something-something-v2'),
    'ssv2-current': ('ssv2', _ssv2_current, 'current', lambda s: '20bn-something-something-v2'),
    'ssv2-mmaction2': ('ssv2', _ssv2_mmaction2, 'mmaction2', lambda s: 'videos'),
    'ssv2-flat': ('ssv2', _ssv2_flat, 'flat', lambda s: ''),
    'k400-cvdfoundation': ('k400', _k400_cvdf, 'cvdfoundation', lambda s: s),
    'k400-mmaction2': ('k400', _k400_mmaction2, 'mmaction2', lambda s: f'videos_{s}'),
    'k400-class-folders': ('k400', _k400_folders, 'class folders', lambda s: s),
}


def expected_files(syn, dataset, split):
    "The sorted file names annotated for `split`."
    if dataset == 'ssv2': return sorted(f"{it['id']}.webm" for it in ssv2_items(syn, split))
    return sorted(f'{stem}.mp4' for _, stem in k400_rows(syn, split))


def make_layout(syn, tmp_path, key):
    dataset, build, _, _ = LAYOUTS[key]
    root = tmp_path / key; root.mkdir()
    build(syn, root)
    return dataset, root
