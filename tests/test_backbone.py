"""Issue 11: the backbone accepts open_clip blocks by what they hold, not by their class."""
import copy
import inspect
import logging
import re

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

import evl_nb.backbone
from evl_nb.backbone import BlockFeatures, CLIPBackbone, build_clip_tower, plain_block_problem
from test_model import _open_clip_block_outputs

TINY = dict(image_size=112, patch_size=16, width=64, layers=6, heads=4, mlp_ratio=4.0, output_dim=32)
READ = [2, 3, 4, 5]


class FusedAttention(nn.Module):
    "An attention module that is not nn.MultiheadAttention but carries its parameter names (open_clip's next layout)."
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads = mha.num_heads
        self.in_proj_weight = nn.Parameter(mha.in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach().clone())
        self.out_proj = copy.deepcopy(mha.out_proj)

    def forward(self, x):
        raise AssertionError('the backbone computes the attention itself')


def _tower(seed=0, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(112, 16, 64, 6, 4, 4.0, output_dim=32, act_layer=QuickGELU, **kw).eval()


def _open_clip_outputs(tower, frames):
    "open_clip's own forward of the whole tower, with each read block's output caught by a hook."
    return _open_clip_block_outputs(tower, frames, READ)


def _check_features(bb, reference_tower, frames):
    feats = bb(frames)
    assert all(type(f) is BlockFeatures for f in feats)
    for f, ref in zip(feats, _open_clip_outputs(reference_tower, frames), strict=True):
        assert (f.out - ref).abs().max().item() <= 1e-5
    # q and k are ln_1(x_in) @ W^T + b of the block, split into heads
    blk, prev = reference_tower.transformer.resblocks[READ[0]], _open_clip_outputs_before(reference_tower, frames)
    y = blk.ln_1(prev)
    w, b = blk.attn.in_proj_weight.detach(), blk.attn.in_proj_bias.detach()
    q = (y @ w[:64].T + b[:64]).view(*y.shape[:2], 4, 16)
    k = (y @ w[64:128].T + b[64:128]).view(*y.shape[:2], 4, 16)
    assert (feats[0].q - q).abs().max().item() <= 1e-5
    assert (feats[0].k - k).abs().max().item() <= 1e-5


def _open_clip_outputs_before(tower, frames):
    "The input of the first read block in open_clip's own forward."
    got = {}
    h = tower.transformer.resblocks[READ[0]].register_forward_pre_hook(lambda m, a: got.__setitem__('x', a[0]))
    with torch.no_grad():
        tower(frames)
    h.remove()
    return got['x']


def test_hand_made_attention_module_gives_open_clip_features():
    "Blocks whose attention is not nn.MultiheadAttention but has in_proj_weight/in_proj_bias/out_proj are accepted."
    original = _tower()
    swapped = copy.deepcopy(original)
    for blk in swapped.transformer.resblocks:
        blk.attn = FusedAttention(blk.attn)
    assert not any(isinstance(b.attn, nn.MultiheadAttention) for b in swapped.transformer.resblocks)
    bb = CLIPBackbone(swapped, READ)
    _check_features(bb, original, torch.randn(3, 3, 112, 112))


def test_open_clip_custom_attention_blocks_match_their_own_forward():
    "open_clip's own `Attention` module (block_type='custom'), compared with open_clip's forward of that tower."
    tower = _tower(block_type='custom')
    assert type(tower.transformer.resblocks[0].attn).__name__ == 'Attention'
    assert not isinstance(tower.transformer.resblocks[0].attn, nn.MultiheadAttention)
    _check_features(CLIPBackbone(tower, READ), tower, torch.randn(2, 3, 112, 112))


def test_plain_multihead_blocks_still_match():
    tower = _tower(seed=1)
    _check_features(CLIPBackbone(tower, READ), tower, torch.randn(2, 3, 112, 112))


@pytest.mark.parametrize('kw, why', [(dict(qk_norm=True), 'ln_q, ln_k'), (dict(scale_attn=True), 'ln_attn'),
                                     (dict(scaled_cosine_attn=True), 'logit_scale'),
                                     (dict(scale_heads=True), 'head_scale'),
                                     (dict(scale_attn_inner=True), 'ln_inner')])
def test_blocks_that_change_the_attention_are_refused(kw, why):
    tower = _tower(block_type='custom', **kw)
    with pytest.raises(ValueError, match=f'block 0 .*not a plain CLIP attention block.*{why}'):
        CLIPBackbone(tower, [5])


def test_blocks_missing_what_the_forward_needs_are_refused():
    tower = _tower()
    blk = tower.transformer.resblocks[3]
    blk.attn = nn.MultiheadAttention(64, 4, kdim=32, vdim=32)  # separate projections: no fused in_proj_weight
    with pytest.raises(ValueError, match=r'block 3 .*fused in_proj_weight'):
        CLIPBackbone(tower, [5])
    del blk.attn
    assert plain_block_problem(blk) == 'it has no attn'
    assert plain_block_problem(_tower().transformer.resblocks[0]) is None


def test_named_tower_needs_no_private_open_clip_function(caplog):
    "A named tower is built with open_clip's public create_model, quietly (no 'initialized randomly' warning)."
    src = inspect.getsource(evl_nb.backbone)
    assert not re.findall(r'open_clip(?:\.\w+)*\._\w+', src)
    with caplog.at_level(logging.WARNING):
        tower = build_clip_tower('ViT-B-32', quick_gelu=False)
    assert isinstance(tower, VisionTransformer)
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert not any('initialized randomly' in r.getMessage() for r in caplog.records)
    assert tower.grid_size == (7, 7) and tower.conv1.out_channels == 768
    assert plain_block_problem(tower.transformer.resblocks[0]) is None
