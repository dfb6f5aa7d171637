"cache_features=K: cached block features give the clip's logits; the trainer trains and evaluates on them."
import torch

from evl_nb.transforms import normalize_clip
from evl_nb.data import TensorClips, random_clips
from evl_nb.features import (DecoderHead, cache_features, collate_features, evaluate_features, feature_bytes_per_view,
                             unpack_features)
from evl_nb.evaluate import evaluate
from evl_nb.model import build_evl
from evl_nb.train import PositionSeeded, TrainConfig, train


def _clips(n=6, train=True, views=1):
    v, l = random_clips(n, num_classes=4, T=8, size=128, seed=1)
    return TensorClips(v, l, crop=112, train=train, views=views)


def test_cached_logits_equal_clip_logits():
    torch.manual_seed(0)
    m = build_evl('evl-tiny', num_classes=4).eval()
    for p in m.decoder.parameters(): p.data.normal_(0, 0.2)     # a decoder that uses every input (trained-like)
    ds = _clips(); seeded = PositionSeeded(ds, seed=5); n = len(ds)
    fc = cache_features(m, ds, views=3, draw=lambda v, i: seeded[(v * n + i, i)], batch_size=4)
    assert len(fc) == 18 and fc.nbytes == 18 * feature_bytes_per_view(m)
    keys = [(v * n + i, i) for v in range(3) for i in range(n)]
    x = normalize_clip(torch.stack([seeded[k]['video'] for k in keys]))
    with torch.no_grad():
        direct = m(x)
        b = collate_features([fc[j] for j in range(18)])
        cached = DecoderHead(m)(unpack_features(b['feats'], b['maps']))
    assert torch.allclose(cached, direct, atol=1e-5, rtol=1e-5), (cached - direct).abs().max()
    assert (direct[:n] - direct[n:2 * n]).abs().max() > 1e-3         # the views differ


def test_cache_keeps_tca_maps_not_q_k():
    m = build_evl('evl-tiny', num_classes=4).eval()
    fc = cache_features(m, _clips(train=False), batch_size=4)
    assert [tuple(t.shape) for t in fc.maps] == [(6, 2, 7, 49, 49)] * 4 and fc.maps[0].dtype == torch.float32
    assert torch.allclose(fc.maps[0].sum(-1), torch.ones(6, 2, 7, 49))      # softmax rows
    assert fc.nbytes == 6 * feature_bytes_per_view(m) == 6 * 947_424


def test_cache_without_tca_stores_out_only():
    m = build_evl('evl-tiny', num_classes=4, enable_temporal_cross_attention=False).eval()
    fc = cache_features(m, _clips(train=False), batch_size=4)
    assert fc.maps is None and fc.layers[0].shape == (6, 8, 50, 64)
    assert fc.nbytes == 6 * feature_bytes_per_view(m) == 6 * 409_600


def test_evaluate_features_matches_evaluate():
    m = build_evl('evl-tiny', num_classes=4).eval()
    for p in m.decoder.parameters(): p.data.normal_(0, 0.2)
    val = _clips(train=False, views=2)
    a, b = evaluate_features(m, cache_features(m, val, batch_size=4)), evaluate(m, val, batch_size=4)
    assert a['num_samples'] == b['num_samples'] == 6 and a['top1'] == b['top1']
    assert a['per_class'] == b['per_class']


def test_train_with_cache_features(tmp_path):
    cfg = TrainConfig(model='evl-tiny', num_classes=4, batch_size=4, max_steps=4, lr=1e-3, output_dir=str(tmp_path),
                      progress=False, ckpt_every=0, resume=False, cache_features=2, seed=3)
    s = train(cfg, _clips(8), _clips(8, train=False))
    assert s['steps'] == 4 and s['val']['num_samples'] == 8
    ck = torch.load(tmp_path / 'checkpoints' / 'step_0000004.pt', weights_only=True)
    assert not any(k.startswith('backbone.') for k in ck['model'])
    assert ck['config']['cache_features'] == 2


def test_cache_features_option_checked():
    import pytest
    with pytest.raises(ValueError, match='cache_features'):
        TrainConfig(cache_features=-1).resolve()


def test_a_decoder_ablation_reuses_the_cache(tmp_path, monkeypatch):
    "Same datasets, same tower: the second run (and a TCA-less control) takes the first run's cache."
    import evl_nb.train as tr
    calls = []
    real = tr.cache_features
    monkeypatch.setattr(tr, 'cache_features', lambda *a, **k: calls.append(k.get('desc')) or real(*a, **k))
    tr.release_feature_caches()
    train_set, val_set = _clips(8), _clips(8, train=False)
    kw = dict(model='evl-tiny', num_classes=4, batch_size=4, max_steps=3, lr=1e-3, progress=False, ckpt_every=0,
              resume=False, cache_features=2, seed=3)
    a = train(TrainConfig(output_dir=str(tmp_path / 'a'), **kw), train_set, val_set)
    assert calls == ['cache train', 'cache val']
    b = train(TrainConfig(output_dir=str(tmp_path / 'b'), **kw), train_set, val_set)
    assert calls == ['cache train', 'cache val'] and a['val']['top1'] == b['val']['top1']     # reused, same run
    off = dict(enable_temporal_conv=False, enable_temporal_pos_embed=False, enable_temporal_cross_attention=False)
    train(TrainConfig(output_dir=str(tmp_path / 'c'), model_overrides=off, **kw), train_set, val_set)
    assert len(calls) == 2                                                               # the control reused it too
    train(TrainConfig(output_dir=str(tmp_path / 'd'), **dict(kw, seed=4)), train_set, val_set)
    assert len(calls) == 4                                              # another seed draws other views: recomputed
    train(TrainConfig(output_dir=str(tmp_path / 'e'), **dict(kw, seed=4)), _clips(8), val_set)
    assert len(calls) == 4                                     # other dataset objects, the same clips: reused
    other = TensorClips(*random_clips(8, num_classes=4, T=8, size=128, seed=2), crop=112)
    train(TrainConfig(output_dir=str(tmp_path / 'f'), **dict(kw, seed=4)), other, val_set)
    assert len(calls) == 6                                              # other clips: recomputed
    tr.release_feature_caches()


def test_in_memory_datasets_are_read_front_to_back(tmp_path, monkeypatch):
    "in_memory reads every clip once: sequential PyAV decoding, no decord seek check."
    import evl_nb.train as trainer
    from evl_nb.synthetic import make_synthetic_dataset
    from evl_nb.train import build_datasets
    root = tmp_path / 'syn'
    make_synthetic_dataset(root, num_classes=2, train_per_class=1, val_per_class=1, num_frames=(8, 8), ssv2=False)
    seen, real = [], trainer.build_dataset          # as the trainer calls it (imported from evl_nb.data)
    monkeypatch.setattr(trainer, 'build_dataset', lambda *a, **k: seen.append(k.get('decode')) or real(*a, **k))
    cfg = TrainConfig(dataset='synthetic', data_root=str(root), num_classes=2, in_memory=True, num_workers=0,
                      output_dir=str(tmp_path / 'run'), progress=False).resolve()
    tr, va = build_datasets(cfg)
    assert seen == ['pyav', 'pyav'] and len(tr) == 2 and len(va) == 2


def _tower_clips(monkeypatch):
    "A list that grows by the clip count of every tower pass (`EVL.backbone_features`)."
    from evl_nb.model import EVL
    seen, real = [], EVL.backbone_features
    monkeypatch.setattr(EVL, 'backbone_features', lambda self, x: seen.append(x.shape[0]) or real(self, x))
    return seen


def test_a_decoder_sweep_runs_the_tower_once(tmp_path, monkeypatch):
    "Four runs that differ in lr and the decoder: the tower sees each cached view once over the whole sweep."
    from evl_nb.features import release_kept_features
    from evl_nb.synthetic import make_synthetic_dataset
    from evl_nb.sweep import run_sweep
    make_synthetic_dataset(tmp_path / 'syn', num_classes=3, train_per_class=2, val_per_class=2, num_frames=(8, 8),
                           ssv2=False, progress=False)
    seen = _tower_clips(monkeypatch)
    release_kept_features()
    params = dict(data_root=str(tmp_path / 'syn'), num_classes=3, batch_size=3, max_steps=2, num_workers=0,
                  progress=False, ckpt_every=0, cache_features=3, eval_views='2x1', threads=1)
    rec = run_sweep(tmp_path / 'sw', {'lr': [3e-3, 1e-3], 'model.decoder_mlp_factor': [4.0, 2.0]}, params,
                    echo=lambda *a: None)
    assert rec['counts'] == {'done': 4}
    assert sum(seen) == 6 * 3 + 6 * 2                 # 6 train clips x 3 views, 6 val clips x 2 views: once
    entries = [p for p in (tmp_path / 'sw' / 'feature_cache').iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / 'meta.json').is_file()
    release_kept_features()


def test_the_disk_cache_is_not_reused_for_another_seed_or_other_data(tmp_path, monkeypatch):
    "Through $EVL_NB_FEATURE_CACHE, as a new process would: the same run reads it; another seed or data does not."
    from evl_nb.features import FEATURE_CACHE_ENV, release_kept_features
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(tmp_path / 'fc'))
    seen = _tower_clips(monkeypatch)
    train_set, val_set = _clips(6), _clips(6, train=False)
    kw = dict(model='evl-tiny', num_classes=4, batch_size=3, max_steps=2, lr=1e-3, progress=False, ckpt_every=0,
              resume=False, cache_features=2, seed=3)
    def run(name, tr=train_set, **over):
        release_kept_features()                                  # nothing kept in memory: the disk or the tower
        n = sum(seen)
        s = train(TrainConfig(output_dir=str(tmp_path / name), **dict(kw, **over)), tr, val_set)
        return sum(seen) - n, s
    built, a = run('a')
    assert built == 6 * 2 + 6
    again, b = run('b', lr=5e-3)
    assert again == 0                                            # read from disk
    c = train(TrainConfig(output_dir=str(tmp_path / 'c'), **kw), train_set, val_set)
    assert c['val']['top1'] == a['val']['top1']                  # the disk cache gives the same run
    assert run('d', seed=4)[0] == built                          # another augmentation seed: other views
    other = TensorClips(*random_clips(6, num_classes=4, T=8, size=128, seed=2), crop=112)
    assert run('e', tr=other)[0] == built                        # other clips
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(tmp_path / 'fc'))
    assert len([p for p in (tmp_path / 'fc').iterdir() if p.is_dir()]) == 3
    release_kept_features()
