"""Attention explorer: extraction against independent recomputations, and headless widget tests that move every control."""
import io, math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_nb.attention import (AttentionMaps, KINDS, extract_attention, measures_table, object_attention_share,
                              object_patches, peak_on_object, prepare_masks, synthetic_attention_measures,
                              temporal_peak_hits, moving_square_clip, prepare_clip, randomize_decoder_)
from evl_nb.viewer import AttentionViewer, export_animation, figure_pixels, snapshot_grid
from evl_nb.model import build_evl, tca_gather

REPO = Path(__file__).resolve().parents[1]
NAMES = [f'action {i}' for i in range(10)]


@pytest.fixture(scope='module')
def setup():
    torch.manual_seed(0)
    model = randomize_decoder_(build_evl('evl-tiny'), seed=1).eval()
    # every decoder parameter is non-zero, so the maps are not uniform and TCA adds something
    assert all(p.abs().sum() > 0 for p in model.trainable_parameters())
    x, frames = prepare_clip(moving_square_clip(8, 112, seed=3), 112)
    with torch.no_grad():
        logits_before = model(x).clone()
        feats = model.backbone_features(x)
        maps = extract_attention(model, x, frames=frames, class_names=NAMES)
        logits_after = model(x).clone()
    return dict(model=model, x=x, frames=frames, maps=maps, feats=feats, before=logits_before, after=logits_after)


# ---------------------------------------------------------------- extraction

def test_shapes(setup):
    m = setup['maps']
    assert m.query.shape == (4, 4, 8, 7, 7) and m.query_cls.shape == (4, 4, 8)
    assert m.tca_prev.shape == m.tca_next.shape == (4, 7, 49, 49)
    assert m.tca_magnitude.shape == (4, 8, 7, 7) and m.logits.shape == (10,)
    assert m.grid == (7, 7) and m.kinds == list(KINDS)


def test_query_maps_sum_to_one_over_all_tokens(setup):
    m = setup['maps']
    total = m.query.sum((2, 3, 4)) + m.query_cls.sum(2)              # per layer, per head
    np.testing.assert_allclose(total, np.ones((4, 4)), atol=1e-5)
    assert (m.query >= 0).all() and (m.query_cls >= 0).all()
    # not uniform: the randomised query really prefers some tokens
    assert m.query.max() > 3 * m.query.min()


def test_query_maps_are_the_decoder_weights_in_frame_order(setup):
    model, x, m = setup['model'], setup['x'], setup['maps']
    with torch.no_grad(): r = model.forward_features(x, return_weights=True)
    L = 50
    for layer in range(4):
        a = r['decoder_attn'][layer][0, :, 0].numpy()                   # heads, T*L
        for t in (0, 5):
            np.testing.assert_allclose(m.query_cls[layer, :, t], a[:, t * L], atol=1e-7)
            for (i, j) in ((0, 0), (2, 5), (6, 6)):
                np.testing.assert_allclose(m.query[layer, :, t, i, j], a[:, t * L + 1 + i * 7 + j], atol=1e-7)


def _direct_temporal_attention(q_t, k_s):
    "softmax_r(<q_t[p], k_s[r]> / sqrt(d)) averaged over heads, written out head by head. q_t, k_s: (hw, heads, d)."
    d = q_t.shape[-1]
    out = torch.zeros(q_t.shape[0], k_s.shape[0], dtype=torch.float64)
    for h in range(q_t.shape[1]):
        logits = q_t[:, h].double() @ k_s[:, h].double().T / math.sqrt(d)
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        out += e / e.sum(dim=1, keepdim=True)
    return (out / q_t.shape[1]).numpy()


def test_tca_maps_equal_direct_recomputation_from_backbone_qk(setup):
    m, feats = setup['maps'], setup['feats']
    for layer in range(4):
        q, k = feats[layer][1][0, :, 1:], feats[layer][2][0, :, 1:]    # T, hw, heads, d (cls dropped)
        for t in range(8):
            if t >= 1:
                np.testing.assert_allclose(m.tca_prev[layer, t - 1], _direct_temporal_attention(q[t], k[t - 1]), atol=1e-6)
            if t <= 6:
                np.testing.assert_allclose(m.tca_next[layer, t], _direct_temporal_attention(q[t], k[t + 1]), atol=1e-6)
    # the per-patch accessor picks the right row and lays it out on the key frame's grid
    A = _direct_temporal_attention(feats[2][1][0, 4, 1:], feats[2][2][0, 3, 1:])
    np.testing.assert_allclose(m.temporal_map(2, 4, (1, 5), 'prev'), A[1 * 7 + 5].reshape(7, 7), atol=1e-6)
    A = _direct_temporal_attention(feats[2][1][0, 4, 1:], feats[2][2][0, 5, 1:])
    np.testing.assert_allclose(m.temporal_map(2, 4, (6, 0), 'next'), A[6 * 7].reshape(7, 7), atol=1e-6)
    assert m.temporal_map(0, 0, (3, 3), 'prev') is None and m.temporal_map(0, 7, (3, 3), 'next') is None
    assert not np.allclose(m.tca_prev[0, 0], 1 / 49)                  # maps are not trivial


def test_tca_magnitude_is_norm_of_added_feature(setup):
    model, m, feats = setup['model'], setup['maps'], setup['feats']
    for layer in range(4):
        q, k = feats[layer][1], feats[layer][2]
        with torch.no_grad(): added = tca_gather(model.decoder.cross_attention[layer], q, k)[0, :, 1:]   # gather form
        expect = added.double().pow(2).sum(-1).sqrt().reshape(8, 7, 7).numpy()
        np.testing.assert_allclose(m.tca_magnitude[layer], expect, rtol=1e-4, atol=1e-5)
    assert (m.tca_magnitude > 0).all()


def test_difference_maps_are_consecutive_differences(setup):
    m = setup['maps']
    for layer in (0, 3):
        for head in (None, 2):
            q = m.query[layer].mean(0) if head is None else m.query[layer, head]
            d = m.difference(layer, head)
            assert d.shape == (7, 7, 7)
            for t in range(1, 8):
                np.testing.assert_allclose(d[t - 1], q[t] - q[t - 1], atol=1e-7)
            v = m.frame_map('diff', layer, 4, head)
            np.testing.assert_allclose(v.array, q[4] - q[3], atol=1e-7)
            assert np.isnan(m.frame_map('diff', layer, 0, head).array).all()


def test_extraction_leaves_logits_unchanged(setup):
    model, x, m = setup['model'], setup['x'], setup['maps']
    assert torch.equal(setup['before'], setup['after'])
    np.testing.assert_allclose(m.logits, setup['before'][0].numpy(), atol=1e-5)
    # training flag and parameters are restored / untouched
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    extract_attention(model, x)
    assert model.training and not model.backbone.training
    model.eval()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_uint8_input_and_batch_index(setup):
    model = setup['model']
    clip = moving_square_clip(8, 112, seed=3)
    a = extract_attention(model, clip)
    np.testing.assert_allclose(a.query, setup['maps'].query, atol=1e-6)
    np.testing.assert_array_equal(a.frames, clip)
    x2 = torch.cat([torch.randn_like(setup['x']), setup['x']])
    b = extract_attention(model, x2, index=1)
    np.testing.assert_allclose(b.query, setup['maps'].query, atol=1e-5)
    np.testing.assert_allclose(b.tca_prev, setup['maps'].tca_prev, atol=1e-5)


def test_model_without_tca():
    torch.manual_seed(0)
    model = randomize_decoder_(build_evl('evl-tiny', enable_temporal_cross_attention=False)).eval()
    m = extract_attention(model, moving_square_clip(8, 112))
    assert m.tca_magnitude is None and 'tca' not in m.kinds
    np.testing.assert_allclose(m.tca_prev.sum(-1), 1, atol=1e-5)
    with pytest.raises(ValueError, match='kind'): m.frame_map('tca', 0, 0)


def test_bad_inputs_are_named(setup):
    model, m = setup['model'], setup['maps']
    with pytest.raises(ValueError, match='8 frames'): extract_attention(model, torch.randn(1, 3, 4, 112, 112))
    with pytest.raises(ValueError, match='class_names'): extract_attention(model, setup['x'], class_names=['a', 'b'])
    with pytest.raises(IndexError, match='index=2'): extract_attention(model, setup['x'], index=2)
    with pytest.raises(IndexError, match='layer=4'): m.query_map(4)
    with pytest.raises(IndexError, match='head=9'): m.query_map(0, 9)
    with pytest.raises(IndexError, match='frame=8'): m.frame_map('query', 0, 8)
    with pytest.raises(IndexError, match='patch'): m.frame_map('prev', 0, 1, patch=(7, 0))
    with pytest.raises(ValueError, match='kind'): m.frame_map('attn', 0, 1)


# ---------------------------------------------------------------- the viewer, headless

def _box(fig, ax):
    "Pixel rows/cols of `ax` in the rendered buffer (origin top-left)."
    bb = ax.get_window_extent()
    H = int(fig.bbox.height)
    return slice(max(0, int(H - bb.y1)), int(H - bb.y0)), slice(max(0, int(bb.x0)), int(bb.x1))


def _changed(a, b, where):
    return (a[where] != b[where]).any(axis=-1).mean()


@pytest.fixture
def viewer(setup):
    return AttentionViewer(setup['maps'])


def _decode_png(b):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(b)).convert('RGBA'))


def test_viewer_initial_state(viewer, setup):
    m = setup['maps']
    assert (viewer.frame, viewer.layer, viewer.head, viewer.kind, viewer.patch) == (0, 3, None, 'query', (3, 3))
    np.testing.assert_array_equal(viewer.current_map, m.query[3].mean(0)[0])
    np.testing.assert_array_equal(viewer.panel.overlay.get_array(), viewer.current_map)
    np.testing.assert_array_equal(viewer.panel.image.get_array(), m.frames[0])
    # what the browser gets is exactly the rendered figure
    np.testing.assert_array_equal(_decode_png(viewer.image.value), viewer.pixels)
    np.testing.assert_array_equal(viewer.pixels, figure_pixels(viewer.fig))
    # top-5 with class names, best first
    top = [n for _, n, _ in m.top_k(5)]
    texts = [t.get_text() for t in viewer.ax_top.texts]
    assert texts[0::2] == top and texts[1::2] == [f'{p:.2f}' for _, _, p in m.top_k(5)]
    assert top[0] == NAMES[int(np.argmax(m.logits))]
    assert viewer.w_row.disabled and viewer.w_col.disabled


def test_viewer_rerender_is_identical(viewer):
    first = viewer.pixels
    viewer.set(frame=4, alpha=0.2)
    viewer.set(frame=0, alpha=0.6)
    np.testing.assert_array_equal(viewer.pixels, first)


def test_viewer_frame_slider(viewer, setup):
    m = setup['maps']
    before, n = viewer.pixels, viewer.renders
    viewer.w_frame.value = 5                                           # as a user moves it
    assert viewer.renders == n + 1
    np.testing.assert_array_equal(viewer.current_map, m.query[3].mean(0)[5])
    np.testing.assert_array_equal(viewer.panel.image.get_array(), m.frames[5])
    main, top = _box(viewer.fig, viewer.ax), _box(viewer.fig, viewer.ax_top)
    assert _changed(before, viewer.pixels, main) > 0.2                  # the picture changed...
    assert _changed(before, viewer.pixels, top) == 0                    # ...the clip's top-5 did not
    np.testing.assert_array_equal(_decode_png(viewer.image.value), viewer.pixels)


def test_viewer_sliders_have_a_fixed_width(viewer):
    "Width 'auto' inside an HBox gives a slider a zero-width track in JupyterLab (tests/test_browser.py drags it)."
    for s in (viewer.w_frame, viewer.w_alpha, viewer.w_row, viewer.w_col):
        w = s.layout.width
        assert w and w.endswith('px') and int(w[:-2]) >= 200, f'{s.description}: width {w!r}'


def test_viewer_layer_and_head(viewer, setup):
    m = setup['maps']
    viewer.set(frame=2)
    before = viewer.pixels
    viewer.w_layer.value = 0
    np.testing.assert_array_equal(viewer.current_map, m.query[0].mean(0)[2])
    assert _changed(before, viewer.pixels, _box(viewer.fig, viewer.ax)) > 0.05
    assert 'layer 0' in viewer.ax.get_title()
    for head in range(4):
        before = viewer.pixels
        viewer.w_head.value = head
        assert viewer.head == head
        np.testing.assert_array_equal(viewer.current_map, m.query[0, head, 2])
        assert _changed(before, viewer.pixels, _box(viewer.fig, viewer.ax)) > 0.01
    viewer.w_head.value = -1                                           # back to the mean
    assert viewer.head is None
    np.testing.assert_array_equal(viewer.current_map, m.query[0].mean(0)[2])


def test_viewer_map_types(viewer, setup):
    m = setup['maps']
    viewer.set(frame=4, layer=1, head=None)
    expect = {'query': m.query[1].mean(0)[4], 'diff': m.query[1].mean(0)[4] - m.query[1].mean(0)[3],
              'prev': m.tca_prev[1, 3, 3 * 7 + 3].reshape(7, 7), 'next': m.tca_next[1, 4, 3 * 7 + 3].reshape(7, 7),
              'tca': m.tca_magnitude[1, 4]}
    shown_frame = {'query': 4, 'diff': 4, 'prev': 3, 'next': 5, 'tca': 4}
    seen = [viewer.pixels]
    for kind in ['diff', 'prev', 'next', 'tca', 'query']:
        viewer.w_kind.value = kind
        np.testing.assert_allclose(viewer.current_map, expect[kind], atol=1e-7)
        np.testing.assert_array_equal(viewer.panel.image.get_array(), m.frames[shown_frame[kind]])
        assert viewer.panel.overlay.get_cmap().name == viewer.current_view.cmap
        assert viewer.panel.marker.get_visible() == (kind in ('prev', 'next'))
        assert viewer.w_row.disabled == (kind not in ('prev', 'next'))
        if kind != 'query':
            assert not any(np.array_equal(viewer.pixels, s) for s in seen), kind
        seen.append(viewer.pixels)
    np.testing.assert_array_equal(seen[-1], seen[0])                    # back to 'query': the same picture again
    # ends of the clip: no previous frame at t=0 -> an empty (transparent) map, the frame still shown
    viewer.set(kind='prev', frame=0)
    assert np.isnan(viewer.current_map).all()
    np.testing.assert_array_equal(viewer.panel.image.get_array(), m.frames[0])


def test_viewer_query_patch_picker(viewer, setup):
    m = setup['maps']
    viewer.set(kind='next', frame=2, layer=2)
    before, mk = viewer.pixels, viewer.panel.marker.get_xy()
    viewer.w_row.value = 1
    np.testing.assert_array_equal(viewer.current_map, m.tca_next[2, 2, 1 * 7 + 3].reshape(7, 7))
    before2 = viewer.pixels
    viewer.w_col.value = 6
    np.testing.assert_array_equal(viewer.current_map, m.tca_next[2, 2, 1 * 7 + 6].reshape(7, 7))
    assert viewer.patch == (1, 6)
    cell = 112 / 7
    np.testing.assert_allclose(viewer.panel.marker.get_xy(), (6 * cell, 1 * cell))
    assert tuple(mk) != tuple(viewer.panel.marker.get_xy())
    main = _box(viewer.fig, viewer.ax)
    assert _changed(before, before2, main) > 0.01 and _changed(before2, viewer.pixels, main) > 0.01
    viewer.set(kind='prev', patch=(5, 2))
    np.testing.assert_array_equal(viewer.current_map, m.tca_prev[2, 1, 5 * 7 + 2].reshape(7, 7))


def test_viewer_opacity(viewer):
    viewer.set(frame=3)
    arr, before = viewer.current_map.copy(), viewer.pixels
    viewer.w_alpha.value = 0.0
    np.testing.assert_array_equal(viewer.current_map, arr)             # same map...
    assert viewer.panel.overlay.get_alpha() == 0.0
    main = _box(viewer.fig, viewer.ax)
    assert _changed(before, viewer.pixels, main) > 0.2                  # ...drawn differently
    # with opacity 0 the axes show the bare frame
    f = setup_frame = viewer.maps.frames[3]
    r, c = main
    crop = viewer.pixels[r, c, :3].astype(int)
    assert abs(crop.mean() - f.mean()) < 25
    viewer.w_alpha.value = 1.0
    assert _changed(before, viewer.pixels, main) > 0.05


def test_viewer_set_validates(viewer):
    with pytest.raises(TypeError, match='zoom'): viewer.set(zoom=2)
    with pytest.raises(ValueError, match='kind'): viewer.set(kind='nope')
    with pytest.raises(IndexError, match='layer'): viewer.set(layer=7)
    viewer.set(layer=-1)
    assert viewer.layer == 3
    bundle = viewer._repr_mimebundle_()
    assert 'application/vnd.jupyter.widget-view+json' in bundle


# ---------------------------------------------------------------- static output

def test_snapshot_grid(setup):
    m = setup['maps']
    fig = snapshot_grid(m, rows='layers', frames=[0, 4, 7])
    assert len(fig.axes) == 12
    px = figure_pixels(fig)
    rows = [_box(fig, fig.axes[i * 3 + 1]) for i in range(4)]
    cells = [px[r, c, :3].astype(int) for r, c in rows]
    h = min(c.shape[0] for c in cells); w = min(c.shape[1] for c in cells)
    assert np.abs(cells[0][:h, :w] - cells[3][:h, :w]).mean() > 1      # layers differ
    fig = snapshot_grid(m, rows='kinds', layer=2, frames=[1, 2], patch=(0, 0))
    assert len(fig.axes) == 2 * len(m.kinds)
    assert [a.get_ylabel() for a in fig.axes[::2]] == [KINDS[k] for k in m.kinds]
    with pytest.raises(ValueError, match='rows'): snapshot_grid(m, rows='heads')
    with pytest.raises(IndexError, match='frame=9'): snapshot_grid(m, frames=[9])


def test_export_gif_and_mp4(setup, tmp_path):
    from PIL import Image
    m = setup['maps']
    g = export_animation(m, tmp_path / 'q.gif', kind='query', layer=1)
    im = Image.open(g)
    assert im.n_frames == 8
    im.seek(0); a = np.asarray(im.convert('RGB')).astype(int)
    im.seek(5); b = np.asarray(im.convert('RGB')).astype(int)
    assert np.abs(a - b).mean() > 1
    import av
    v = export_animation(m, tmp_path / 'd.mp4', kind='prev', patch=(2, 2))
    with av.open(str(v)) as c:
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape[0] % 2 == 0
    with pytest.raises(ValueError, match='gif or .mp4'): export_animation(m, tmp_path / 'x.webm')


# ---------------------------------------------------------------- the explore notebook, with a real video file

def test_explore_notebook_runs_on_a_video_file(tmp_path, monkeypatch):
    papermill = pytest.importorskip('papermill')
    import av
    clip = moving_square_clip(20, 96, seed=5)
    path = tmp_path / 'clip.mp4'
    with av.open(str(path), 'w') as out:
        st = out.add_stream('mpeg4', rate=Fraction(10)); st.width = st.height = 96; st.pix_fmt = 'yuv420p'
        for f in clip:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): out.mux(p)
        for p in st.encode(): out.mux(p)
    monkeypatch.setenv('PYTHONPATH', str(REPO))
    nb = papermill.execute_notebook(str(REPO / 'nbs' / 'explore.ipynb'), str(tmp_path / 'out.ipynb'),
                                    parameters=dict(video=str(path), class_names=NAMES, untrained=True), cwd=str(tmp_path),
                                    progress_bar=False, kernel_name='python3')
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    text = ''.join(o.get('text', '') for o in outs if o.get('output_type') == 'stream')
    assert str(path) in text and 'action' in text
    assert any('image/png' in o.get('data', {}) for o in outs)                     # the static snapshot
    assert any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in outs)


# ---------------------------------------------------------------- measures against the truth (hand-made maps)

def _toy(query, prev, nxt, obj, px=4):
    "AttentionMaps from hand-made query `(L, heads, T, h, w)` and temporal maps, object patches `obj` `(T, h, w)`."
    L, _, T, h, w = query.shape
    pixels = np.kron(np.asarray(obj, np.float32), np.ones((px, px), np.float32))
    return AttentionMaps(frames=np.zeros((T, h * px, w * px, 3), np.uint8), query=np.asarray(query, np.float32),
                         query_cls=np.zeros(query.shape[:3], np.float32), tca_prev=prev, tca_next=nxt, tca_magnitude=None,
                         logits=np.zeros(3, np.float32), grid=(h, w), object_pixels=pixels)


def _moving_object(T=4, h=4, w=5):
    "The object fills patch (1, t) in frame t: it moves one patch to the right per frame."
    obj = np.zeros((T, h, w), bool)
    for t in range(T): obj[t, 1, t] = True
    return obj


def _peak_maps(T, h, w, shift):
    "Temporal maps of every query patch peaking `shift` columns away (clamped), with a small uniform floor."
    hw = h * w
    A = np.full((1, T - 1, hw, hw), 0.1 / hw, np.float32)
    for p in range(hw):
        r, c = divmod(p, w)
        A[0, :, p, r * w + min(max(c + shift, 0), w - 1)] += 0.9
    return A


def test_object_share_known_answer():
    T, h, w = 3, 4, 5
    obj = _moving_object(T, h, w); obj[2] = False                         # invisible in the last frame
    q = np.full((2, 2, T, h, w), 1.0, np.float32)                         # 2 layers, 2 heads
    q[0, 0, 0, 1, 0] = 21.0                                               # layer 0 head 0, frame 0: 21 / (19 + 21) on the object
    q[1, :, 1] = 0; q[1, :, 1, 1, 1] = 1.0                                # layer 1, frame 1: everything on the object
    m = _toy(q, _peak_maps(T, h, w, 0), _peak_maps(T, h, w, 0), obj)
    s = object_attention_share(m)
    np.testing.assert_allclose(s['baseline'][:2], [1 / 20, 1 / 20]); assert np.isnan(s['baseline'][2])
    np.testing.assert_allclose(s['share'][0, :2], [11 / 30, 1 / 20], rtol=1e-6)    # of the mean over heads: 11 of 30
    np.testing.assert_allclose(s['share'][1, :2], [1 / 20, 1.0], rtol=1e-6)
    assert np.isnan(s['share'][:, 2]).all() and s['frames'] == 2
    np.testing.assert_allclose(s['mean_share'], [(11 / 30 + 1 / 20) / 2, (1 / 20 + 1) / 2], rtol=1e-6)
    np.testing.assert_allclose(object_attention_share(m, head=0)['share'][0, 0], 21 / 40, rtol=1e-6)
    # uniform attention scores exactly the uniform baseline
    u = object_attention_share(_toy(np.ones((1, 1, T, h, w)), None, None, obj))
    np.testing.assert_allclose(u['share'][0, :2], u['baseline'][:2])


def test_temporal_peaks_follow_the_motion_known_answer():
    T, h, w = 4, 4, 5
    obj = _moving_object(T, h, w)
    q = np.ones((1, 1, T, h, w), np.float32)
    # maps that follow the motion: looking back, the object is one column left; looking ahead, one column right
    follow = _toy(q, _peak_maps(T, h, w, -1), _peak_maps(T, h, w, +1), obj)
    r = temporal_peak_hits(follow)
    for d in ('prev', 'next'):
        np.testing.assert_array_equal(r[d]['rate'], [1.0]); np.testing.assert_array_equal(r[d]['queries'], [1, 1, 1])
        assert r[d]['chance'] == pytest.approx(1 / 20) and r[d]['same_place'] == 0.0    # it moved a whole patch
    # maps that stay put never find it; maps that look the wrong way neither
    for shift_prev, shift_next in ((0, 0), (+1, -1)):
        r = temporal_peak_hits(_toy(q, _peak_maps(T, h, w, shift_prev), _peak_maps(T, h, w, shift_next), obj))
        assert r['prev']['rate'][0] == 0 and r['next']['rate'][0] == 0
    # per query patch, as the viewer shows it
    assert peak_on_object(follow, 0, 2, (1, 2), 'prev') is True and peak_on_object(follow, 0, 2, (1, 2), 'next') is True
    assert peak_on_object(follow, 0, 0, (1, 0), 'prev') is None                      # no frame before t=0
    # a big object that overlaps itself: staying put 'finds' it, and same_place says so
    big = np.zeros((2, h, w), bool); big[0, 1, 0:3] = True; big[1, 1, 1:4] = True
    r = temporal_peak_hits(_toy(np.ones((1, 1, 2, h, w)), _peak_maps(2, h, w, 0), _peak_maps(2, h, w, 0), big))
    assert r['prev']['rate'][0] == pytest.approx(2 / 3) and r['prev']['same_place'] == pytest.approx(2 / 3)


def test_object_patches_threshold_and_errors():
    px = np.zeros((1, 8, 8), np.float32); px[0, 0:2, 0:2] = 1                        # a quarter of patch (0, 0) of a 2x2 grid
    m = _toy(np.ones((1, 1, 1, 2, 2)), None, None, np.zeros((1, 2, 2)), px=4)
    m.object_pixels = px
    assert object_patches(m, 0.2)[0].tolist() == [[True, False], [False, False]]
    assert not object_patches(m, 0.3).any()
    m.object_pixels = None
    with pytest.raises(ValueError, match='no object masks'): object_patches(m)


def test_masks_go_through_the_clips_own_transform():
    "An object drawn white on black: its prepared mask is the prepared clip's own pixels (same frame pick, resize, crop)."
    from evl_nb.synthetic import render_clip_tracked, object_masks
    _, _, track = render_clip_tracked(2, 12, 96, 120, rng=4)
    masks = object_masks(track)
    clip = np.repeat((masks * 255).astype(np.uint8)[..., None], 3, -1)
    _, frames = prepare_clip(clip, 56, num_frames=5)
    np.testing.assert_allclose(prepare_masks(masks, 56, num_frames=5), frames[..., 0] / 255, atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match=r'\(T, H, W\)'): prepare_masks(np.zeros((3, 4)), 8)


@pytest.fixture(scope='module')
def tracked(setup):
    from evl_nb.synthetic import render_clip_tracked, object_masks
    fr, _, track = render_clip_tracked(0, 16, 128, 160, rng=0)
    return extract_attention(setup['model'], fr, class_names=NAMES, object_masks=object_masks(track))


def test_viewer_and_snapshot_show_the_measures(tracked):
    v = AttentionViewer(tracked)
    assert v.measures in v.widget.children and 'uniform' in v.measures.value and v.panel.object.get_visible()
    s = object_attention_share(tracked)
    first = v.measures.value
    v.set(frame=5)
    assert v.measures.value != first and f"{100 * s['share'][3, 5]:.0f}%" in v.measures.value
    v.set(kind='prev', patch=(3, 3))
    assert 'this query patch' in v.measures.value or peak_on_object(tracked, 3, 5, (3, 3), 'prev') is None
    assert 'A(t &lt;- t-1)' in v.measures.value
    fig = snapshot_grid(tracked, rows='kinds', frames=[0, 4], patch=(3, 3))
    assert 'uniform' in fig._suptitle.get_text()
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(n.startswith('obj ') for n in notes)
    # without masks: no measures line, no box
    plain = AttentionViewer(AttentionMaps(**{**tracked.__dict__, 'object_pixels': None}))
    assert plain.measures not in plain.widget.children and not plain.panel.object.get_visible()


def test_measures_over_a_synthetic_dataset(setup, tmp_path):
    from evl_nb.synthetic import make_synthetic_dataset
    syn = make_synthetic_dataset(tmp_path / 's', num_classes=3, train_per_class=1, val_per_class=2, num_frames=(10, 12),
                                 size=128, ssv2=False)
    r = synthetic_attention_measures(setup['model'], syn.root)
    assert r['clips'] == 6 and 0 <= r['top1'] <= 1 and len(r['object_share']) == 4 and r['frames_with_object'] > 0
    assert 0 < r['uniform_baseline'] < 0.5 and r['queries_prev'] > 0
    u = synthetic_attention_measures(build_evl('evl-tiny').eval(), syn.root, limit=2)    # zero query: layer 0 is uniform
    assert u['clips'] == 2 and u['object_share'][0] == pytest.approx(u['uniform_baseline'], abs=1e-6)
    assert '| untrained |' in measures_table({'untrained': u})
