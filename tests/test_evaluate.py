"""Evaluation: metrics, multi-view averaging, class-list mapping, official-layout checkpoints."""
import json

import pytest
import torch
import torch.nn.functional as F

from evl_nb.transforms import parse_views
from evl_nb.evaluate import classification_metrics, evaluate, label_mapping, load_class_list, save_results
from evl_nb.model import build_evl, load_checkpoint
from evl_nb.data import TensorClips, random_clips


def test_metrics_by_hand():
    probs = torch.tensor([[.5, .3, .2], [.1, .2, .7], [.25, .4, .35], [.6, .1, .3], [.2, .5, .3]])
    labels = torch.tensor([0, 2, 2, 1, 1])
    m = classification_metrics(probs, labels, ['a', 'b', 'c'], topk=2)
    assert m['top1'] == pytest.approx(3 / 5)
    assert m['top5'] == pytest.approx(4 / 5)                 # top-2 here (k is capped at the class count / topk)
    assert m['mean_class_accuracy'] == pytest.approx((1 + .5 + .5) / 3)
    assert m['confusion_matrix'] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert {(c['true'], c['predicted']) for c in m['worst_confusions']} == {('b', 'a'), ('c', 'b')}
    assert [c['n'] for c in m['per_class']] == [1, 2, 2]


def test_probabilities_are_averaged_not_logits():
    "Two views whose logit mean and probability mean disagree: the probability mean decides."
    class M(torch.nn.Module):
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, x):
            first = x[:, 0, 0, 0, 0] > 0   # view 0 vs view 1 by content
            out = torch.where(first[:, None], torch.tensor([[0., 20.]]), torch.tensor([[2., 0.]]))
            return out
    v = torch.zeros(3, 3, 1, 2, 2, dtype=torch.uint8); v[0] = 255                # (V=3, 3, T, H, W)
    ds = TensorClips(v[None].expand(3, *v.shape).clone(), [0, 0, 0], ['a', 'b'], train=False)
    m = evaluate(M(), ds, batch_size=2)
    # mean logits favour class 1 ([1.33, 6.67]); mean probabilities favour class 0 (~0.59 vs ~0.41)
    p = (F.softmax(torch.tensor([0., 20.]), 0) + 2 * F.softmax(torch.tensor([2., 0.]), 0)) / 3
    assert p[0] > p[1] and m['top1'] == 1.0


def test_label_mapping_and_class_lists(tmp_path):
    (tmp_path / 'c.json').write_text(json.dumps(['riding a bike', 'abseiling']))
    assert load_class_list(tmp_path / 'c.json') == ['riding a bike', 'abseiling']
    assert label_mapping(['abseiling', 'riding_a_bike'], load_class_list(tmp_path / 'c.json')).tolist() == [1, 0]
    with pytest.raises(ValueError, match='juggling'): label_mapping(['juggling'], ['abseiling'])
    with pytest.raises(ValueError, match='eval_views'): parse_views('three', 'eval_views')


def test_official_checkpoint_with_its_class_order(tmp_path):
    "An official-layout release ('module.' keys) whose outputs are in reverse order: mapping by the class list fixes it."
    torch.manual_seed(0)
    net = build_evl('evl-tiny', num_classes=4, decoder_num_layers=1).eval()
    v, l = random_clips(8, 4, T=8, size=112, seed=2)
    ds = TensorClips(v, l, ['w', 'x', 'y', 'z'], train=False)
    # permute the head so the release's output j means dataset class 3-j
    sd = {k: val.clone() for k, val in net.state_dict().items()}
    for k in ('proj.2.weight', 'proj.2.bias'): sd[k] = sd[k].flip(0)
    torch.save({'model': {'module.' + k: val for k, val in sd.items()}}, tmp_path / 'release.pth')
    (tmp_path / 'classes.json').write_text(json.dumps(['z', 'y', 'x', 'w']))
    other = build_evl('evl-tiny', num_classes=4, decoder_num_layers=1)
    other.backbone.load_state_dict(net.backbone.state_dict())
    load_checkpoint(other, tmp_path / 'release.pth')
    a = evaluate(net, ds, batch_size=4)
    b = evaluate(other, ds, batch_size=4, classes=load_class_list(tmp_path / 'classes.json'),
                 label_map=label_mapping(ds.classes, load_class_list(tmp_path / 'classes.json')))
    assert a['num_samples'] == b['num_samples'] == 8
    assert a['top1'] == pytest.approx(b['top1']) and a['top5'] == pytest.approx(b['top5'])
    wrong = evaluate(other, ds, batch_size=4)             # without the mapping the labels are scrambled
    assert wrong['confusion_matrix'] != a['confusion_matrix']
    out = save_results(b, tmp_path / 'r.json')
    assert json.loads(out.read_text())['num_samples'] == 8


def test_skipped_files_are_named_in_the_summaries(tmp_path):
    "A truncated validation video and a zero-byte training video (real files): both named with file:line, not by index."
    from evl_nb.data import build_dataset
    from evl_nb.evaluate import format_report
    from evl_nb.synthetic import make_synthetic_dataset
    from evl_nb.train import TrainConfig, run
    root = tmp_path / 'k400'
    make_synthetic_dataset(root, num_classes=2, train_per_class=2, val_per_class=2, num_frames=(8, 8), ssv2=False)
    val_csv, train_csv = root / 'annotations' / 'k400_val.csv', root / 'annotations' / 'k400_train.csv'
    vids = {p.stem: p for p in root.rglob('*.mp4')}
    def video_of(csv_file, line):
        r = csv_file.read_text().splitlines()[line - 1].split(',')
        return vids[f'{r[1]}_{int(r[2]):06d}_{int(r[3]):06d}']
    bad_val, bad_train = video_of(val_csv, 3), video_of(train_csv, 2)
    bad_val.write_bytes(bad_val.read_bytes()[:2000]); bad_train.write_bytes(b'')
    net = build_evl('evl-tiny', num_classes=2, decoder_num_layers=1)
    ds = build_dataset('k400', 'val', data_root=root, ann_file=val_csv, num_frames=8, input_size=112)
    m = evaluate(net, ds, batch_size=2)
    assert m['num_skipped'] == 1 and m['num_samples'] == 3
    assert m['skipped_files'] == [dict(index=1, path=str(bad_val), where=f'{val_csv}:3', reason=m['skipped_files'][0]['reason'])]
    assert f'{bad_val} ({val_csv}:3)' in format_report(m)
    s = run(TrainConfig(dataset='k400', data_root=str(root), train_ann=str(train_csv), val_ann=str(val_csv), model='evl-tiny',
                        num_classes=2, batch_size=4, max_steps=2, num_workers=0, eval_views='1x1', output_dir=str(tmp_path / 'run'),
                        progress=False, model_overrides=dict(decoder_num_layers=1)))
    assert s['train_skipped'] >= 1
    (rec,) = s['train_skipped_files']
    assert rec['path'] == str(bad_train) and rec['where'] == f'{train_csv}:2' and rec['count'] == s['train_skipped']
    assert s['val']['skipped_files'][0]['where'] == f'{val_csv}:3'


PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _metrics_with_known_confusions(K=60):
    "K classes, 2 clips each, all right except: class 5 -> 11 (both clips), class 20 -> 11 (one), class 33 -> 2 (one)."
    labels = torch.arange(K).repeat(2)
    pred = labels.clone()
    pred[5] = pred[5 + K] = 11; pred[20] = 11; pred[33] = 2
    return classification_metrics(F.one_hot(pred, K).float(), labels)


def test_plot_confusion_of_many_classes_keeps_the_most_confused(tmp_path):
    "Over max_labels classes the matrix keeps the rows/cols of the classes in errors, the worst first; the PNG is written."
    matplotlib = pytest.importorskip('matplotlib'); matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from evl_nb.evaluate import plot_confusion
    m = _metrics_with_known_confusions()
    fig = plot_confusion(m, max_labels=6, path=tmp_path / 'out' / 'confusion_matrix.png')
    ax = fig.axes[0]
    # errors on/into: 11: 3, 5: 2, 2: 1, 20: 1, 33: 1, then the rest (0 errors) by index: 0
    assert [t.get_text() for t in ax.get_yticklabels()] == ['11', '5', '2', '20', '33', '0']
    assert [t.get_text() for t in ax.get_xticklabels()] == ['11', '5', '2', '20', '33', '0']
    assert ax.get_xlabel() == 'predicted' and ax.get_ylabel() == 'true' and '6 most confused of 60' in ax.get_title()
    row5 = ax.images[0].get_array()[1].tolist()               # class 5: both clips predicted 11
    assert row5 == [1, 0, 0, 0, 0, 0]
    assert (tmp_path / 'out' / 'confusion_matrix.png').read_bytes()[:8] == PNG_MAGIC
    plt.close(fig)
    fig = plot_confusion(m)                                     # default: 40 of the 60
    assert len(fig.axes[0].get_yticklabels()) == 40
    plt.close(fig)


def test_plot_per_class_weakest_first(tmp_path):
    matplotlib = pytest.importorskip('matplotlib'); matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from evl_nb.evaluate import plot_per_class
    m = _metrics_with_known_confusions()
    fig = plot_per_class(m, max_bars=4, path=tmp_path / 'per_class_accuracy.png')
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ['5 (2)', '20 (2)', '33 (2)', '0 (2)']
    assert [p.get_width() for p in ax.patches] == [0, 50, 50, 100]
    assert ax.get_xlabel() == 'top-1 (%)' and '4 weakest of 60' in ax.get_title()
    assert (tmp_path / 'per_class_accuracy.png').read_bytes()[:8] == PNG_MAGIC
    plt.close(fig)
