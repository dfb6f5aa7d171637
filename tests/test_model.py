"""Issue 2 acceptance: the EVL model reproduces the official code and loads every checkpoint layout strictly."""
import copy

import open_clip
import pytest
import torch
from torch import nn

from conftest import fixture_path
from evl_nb.backbone import build_backbone, build_clip_tower
from evl_nb.model import (PRESETS, TemporalCrossAttention, build_evl, get_config, load_checkpoint, reference_model,
                          tca_gather)

TINY_TOWER = dict(image_size=112, patch_size=16, width=64, layers=6, heads=4, mlp_ratio=4.0, output_dim=32)


@pytest.fixture(scope='module')
def ref():
    return torch.load(fixture_path('evl_reference_tiny.pt'), weights_only=True)


def official_keys(n_layers=4):
    "The official state-dict names, written out from the spec (independent of the model code)."
    keys = ['decoder.cls_token']
    for i in range(n_layers):
        keys += [f'decoder.decoder_layers.{i}.attn.{p}.{w}' for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')
                 for w in ('weight', 'bias')]
        keys += [f'decoder.decoder_layers.{i}.mlp.{p}.{w}' for p in ('fc1', 'fc2') for w in ('weight', 'bias')]
        keys += [f'decoder.decoder_layers.{i}.{p}.{w}' for p in ('norm1', 'norm2', 'norm3') for w in ('weight', 'bias')]
    keys += [f'decoder.temporal_conv.{i}.{w}' for i in range(n_layers) for w in ('weight', 'bias')]
    keys += [f'decoder.temporal_pos_embed.{i}' for i in range(n_layers)]
    keys += [f'decoder.cross_attention.{i}.{w}' for i in range(n_layers) for w in ('w1', 'w2')]
    keys += ['proj.0.weight', 'proj.0.bias', 'proj.2.weight', 'proj.2.bias']
    return keys


# --- the reference fixture ---------------------------------------------------------------------------------------

def test_reference_fixture_every_intermediate(ref):
    model = reference_model(ref)
    with torch.no_grad():
        got = model.forward_features(ref['input'])
    for key in ('block_out', 'block_q', 'block_k', 'temporal_conv_out', 'tca_out', 'decoder_query'):
        assert len(got[key]) == len(ref[key]) == ref['config']['decoder_num_layers']
        for i, (a, b) in enumerate(zip(got[key], ref[key])):
            assert a.shape == b.shape, (key, i)
            assert (a - b).abs().max().item() <= 1e-5, f'{key}[{i}] differs from the official code'
    assert (got['logits'] - ref['logits']).abs().max().item() <= 1e-5
    with torch.no_grad():  # the plain forward gives the same logits as forward_features
        assert (model(ref['input']) - ref['logits']).abs().max().item() <= 1e-5


def test_reference_fixture_gather_tca(ref):
    "The official gather form of TCA gives the stored TCA output too (and equals the offset form)."
    model = reference_model(ref)
    for i, tca in enumerate(model.decoder.cross_attention):
        q, k = ref['block_q'][i], ref['block_k'][i]
        assert (tca_gather(tca, q, k) - ref['tca_out'][i]).abs().max() <= 1e-5
        assert (tca(q, k) - tca_gather(tca, q, k)).abs().max() <= 1e-5


def test_tca_offset_form_equals_gather_on_b16_grid():
    torch.manual_seed(0)
    tca = TemporalCrossAttention((14, 14), 32)
    nn.init.normal_(tca.w1); nn.init.normal_(tca.w2)
    q, k = torch.randn(1, 3, 197, 12, 64), torch.randn(1, 3, 197, 12, 64)
    with torch.no_grad():
        assert torch.allclose(tca(q, k), tca_gather(tca, q, k), atol=1e-5)


def test_tca_boundary_frames():
    "Frame 0 only receives from frame 1 (w2), the last frame only from its predecessor (w1)."
    tca = TemporalCrossAttention((2, 2), 4)
    nn.init.normal_(tca.w1)  # w2 stays zero: only t >= 1 can receive anything
    q, k = torch.randn(1, 3, 5, 2, 8), torch.randn(1, 3, 5, 2, 8)
    out = tca(q, k).detach()
    assert out[:, 0].abs().max() == 0 and out[:, 1:, 1:].abs().min() > 0 and out[:, :, 0].abs().max() == 0


# --- the paper's models ------------------------------------------------------------------------------------------

def test_b16_parameter_count_and_official_keys():
    m = build_evl('evl-b16-8f')
    assert sum(p.numel() for p in m.trainable_parameters()) == 33_183_376
    assert list(m.state_dict()) == official_keys(4)
    assert all(not p.requires_grad for p in m.backbone.parameters())


@pytest.mark.slow
def test_l14_parameter_count():
    m = build_evl('evl-l14-8f')
    assert sum(p.numel() for p in m.trainable_parameters()) == 58_727_824


def test_presets():
    assert {'evl-b16-8f', 'evl-b16-16f', 'evl-b16-32f', 'evl-l14-8f', 'evl-l14-16f', 'evl-l14-32f', 'evl-l14-336-32f',
            'evl-b16-8f-ssv2', 'evl-tiny'} <= set(PRESETS)
    ssv2 = get_config('evl-b16-8f-ssv2')
    assert (ssv2.num_classes, ssv2.decoder_num_layers, ssv2.sampling) == (174, 12, 'uniform')
    assert (get_config('evl-b16-32f').num_frames, get_config('evl-b16-32f').frame_interval) == (32, 8)
    tower = build_clip_tower('ViT-L-14-336')
    assert tuple(tower.grid_size) == (24, 24)


def test_overrides_switch_temporal_modules_off():
    m = build_evl('evl-tiny', enable_temporal_conv=False, enable_temporal_pos_embed=False,
                  enable_temporal_cross_attention=False, num_classes=7, decoder_num_layers=2)
    keys = list(m.state_dict())
    assert not any(('temporal' in k or 'cross_attention' in k) for k in keys)
    assert m(torch.randn(1, 3, 8, 112, 112)).shape == (1, 7)
    with pytest.raises(ValueError, match='num_frame'):
        build_evl('evl-tiny', num_frame=4)


def test_tiny_training_step_trains_only_the_decoder():
    m = build_evl('evl-tiny').train()
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-3)
    x, y = torch.randn(4, 3, 8, 112, 112), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in m.trainable_parameters()]
    loss = nn.functional.cross_entropy(m(x), y); loss.backward(); opt.step()  # its speed: benchmarks/model_throughput.py
    assert any(not torch.equal(a, b) for a, b in zip(before, m.trainable_parameters()))
    assert all(p.grad is None for p in m.backbone.parameters())


def test_init_follows_spec():
    m = build_evl('evl-tiny')
    d = m.decoder
    assert d.cls_token.abs().max() == 0
    assert all(p.abs().max() == 0 for p in d.temporal_pos_embed)
    assert all(t.w1.abs().max() == 0 and t.w2.abs().max() == 0 for t in d.cross_attention)
    assert all(l.attn.q_proj.bias.abs().max() == 0 for l in d.decoder_layers)
    assert all(0 < l.mlp.fc1.bias.abs().max() < 1e-4 for l in d.decoder_layers)


# --- checkpoints -------------------------------------------------------------------------------------------------

def _random_tiny():
    torch.manual_seed(1)
    m = build_evl('evl-tiny').eval()
    for p in m.trainable_parameters():
        nn.init.normal_(p, std=0.05)
    return m


def _same_tower(dst, src):
    dst.backbone.load_state_dict(src.backbone.state_dict())
    return dst


def test_official_and_mmaction2_layouts_load_strictly_and_agree(tmp_path):
    src = _random_tiny()
    sd = src.state_dict()
    torch.save({'model': {'module.' + k: v for k, v in sd.items()}, 'epoch': 3}, tmp_path / 'official.pth')
    mm = {}
    for k, v in sd.items():
        k = k.replace('decoder.', 'backbone.decoder.', 1) if k.startswith('decoder.') else k
        k = k.replace('proj.0.', 'backbone.layer_norm.').replace('proj.2.', 'cls_head.fc_cls.')
        mm[k] = v
    mm.update({'backbone.backbone.conv1.weight': torch.zeros(64, 3, 16, 16)})  # the port also carried the tower
    torch.save({'state_dict': mm, 'meta': {}}, tmp_path / 'mmaction2.pth')
    x = torch.randn(2, 3, 8, 112, 112)
    with torch.no_grad():
        expected = src(x)
        outs = []
        for f in ('official.pth', 'mmaction2.pth'):
            m = _same_tower(build_evl('evl-tiny').eval(), src)
            load_checkpoint(m, tmp_path / f)
            outs.append(m(x))
    assert torch.equal(outs[0], expected) and torch.equal(outs[1], expected)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    src = _random_tiny()
    torch.save({'model': src.state_dict()}, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match='truncated.pth.*cannot be read'):
        load_checkpoint(build_evl('evl-tiny'), tmp_path / 'truncated.pth')
    with pytest.raises(ValueError, match=r'proj\.2\.weight'):
        load_checkpoint(build_evl('evl-tiny', num_classes=5), tmp_path / 'good.pth')
    with pytest.raises(ValueError, match='missing keys'):
        load_checkpoint(build_evl('evl-tiny', decoder_num_layers=5), tmp_path / 'good.pth')
    with pytest.raises(ValueError, match='interpolate_pos_embed'):
        load_checkpoint(build_evl('evl-tiny', num_frames=16), tmp_path / 'good.pth')
    m16 = build_evl('evl-tiny', num_frames=16)
    load_checkpoint(m16, tmp_path / 'good.pth', interpolate_pos_embed=True)
    assert m16.decoder.temporal_pos_embed[0].shape == (16, 64)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(build_evl('evl-tiny'), tmp_path / 'absent.pth')


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    torch.save({'model': Evil()}, tmp_path / 'evil.pth', _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match='cannot be read'):
        load_checkpoint(build_evl('evl-tiny'), tmp_path / 'evil.pth')


# --- CLIP weights from files -------------------------------------------------------------------------------------

def _openai_style_clip():
    torch.manual_seed(2)
    vision = dict(image_size=112, patch_size=16, width=64, layers=6, head_width=16)
    text = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(32, vision, text, quick_gelu=True).eval()


def _open_clip_block_outputs(visual, x, blocks):
    outs = {}
    hooks = [visual.transformer.resblocks[j].register_forward_hook(lambda m, i, o, j=j: outs.__setitem__(j, o))
             for j in blocks]
    with torch.no_grad():
        visual(x)
    for h in hooks:
        h.remove()
    return [outs[j] for j in blocks]


@pytest.mark.parametrize('layout', ['full', 'visual_only', 'jit'])
def test_pretrained_file_gives_open_clip_features(tmp_path, layout):
    clip = _openai_style_clip()
    path = tmp_path / f'{layout}.pt'
    if layout == 'full':
        torch.save(clip.state_dict(), path)
    elif layout == 'visual_only':
        torch.save(clip.visual.state_dict(), path)
    else:
        torch.jit.save(torch.jit.trace(clip.visual, torch.randn(1, 3, 112, 112), check_trace=False), str(path))
    model = build_evl('evl-tiny', pretrained=path).eval()
    x = torch.randn(2, 3, 8, 112, 112)
    ours = model.backbone_features(x)
    frames = x.permute(0, 2, 1, 3, 4).reshape(16, 3, 112, 112)
    theirs = _open_clip_block_outputs(clip.visual, frames, [2, 3, 4, 5])
    for (out, _, _), ref in zip(ours, theirs):
        assert torch.allclose(out.reshape(16, 50, 64), ref, atol=1e-5)


def test_wrong_shaped_pretrained_file_is_refused(tmp_path):
    clip = _openai_style_clip()
    sd = clip.state_dict()
    sd['visual.positional_embedding'] = torch.zeros(197, 64)
    del sd['visual.ln_pre.weight']
    torch.save(sd, tmp_path / 'wrong.pt')
    with pytest.raises(ValueError, match=r'ln_pre\.weight.*positional_embedding'):
        build_evl('evl-tiny', pretrained=tmp_path / 'wrong.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='junk.pt'):
        build_evl('evl-tiny', pretrained=tmp_path / 'junk.pt')


def test_gelu_flavour():
    from open_clip.transformer import QuickGELU
    assert isinstance(build_backbone('ViT-B-32', [-1]).tower.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(build_backbone(TINY_TOWER, [-1], quick_gelu=False).tower.transformer.resblocks[0].mlp.gelu, nn.GELU)


# --- precision ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_low_precision_towers_on_cpu(ref, precision):
    model = reference_model(ref)
    with torch.no_grad():
        fp32 = model(ref['input'])
        model.backbone.set_precision(precision)
        low = model(ref['input'])
    assert model.backbone.tower.ln_pre.weight.dtype == torch.float32
    assert (low - fp32).abs().max().item() <= 2e-2
    assert not torch.equal(low, fp32)
