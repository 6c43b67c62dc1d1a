"""Behaviour of the MaSSFormer model and its building blocks (CPU, small inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from addclass.models.build import MASSFORMER_PIXEL_DECODERS, MODEL_BUILDERS, build_massformer_tiny
from addclass.models.massformer.deform import DeformLayer, deform_conv2d
from addclass.models.massformer.model import IMAGENET_MEAN, MaSSFormer
from addclass.models.massformer.pixel_decoder import SEB, window_partition, window_reverse
from addclass.models.parts.position_encoding import sine_position_encoding
from addclass.models.parts.transformer_decoder import MaskedTransformerDecoder

NUM_CLASSES = 7
VARIANT_LAYERS = {"r50": 6, "lite_r18": 6, "tiny": 3}
VARIANT_QUERIES = {"r50": 100, "lite_r18": 100, "tiny": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The dev/CI box has 2 cores shared by several processes: with 2 intra-op threads every parallel op waits
    # for a descheduled sibling thread (x10-x100 slowdowns). One thread keeps these tests' time predictable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 255.0


# The MaSSFormer variants; the baselines have their own tests (tests/models/test_baselines.py).
MASSFORMER_VARIANTS = sorted(VARIANT_LAYERS)


def _build(variant: str, pixel_decoder: str | None) -> MaSSFormer:
    torch.manual_seed(0)
    return MODEL_BUILDERS[variant](NUM_CLASSES, pixel_decoder=pixel_decoder)


@pytest.mark.parametrize("pixel_decoder", MASSFORMER_PIXEL_DECODERS)
@pytest.mark.parametrize("variant", MASSFORMER_VARIANTS)
def test_forward_backward_odd_input(variant: str, pixel_decoder: str) -> None:
    model = _build(variant, pixel_decoder).train()
    h, w = 67, 93  # pads to 256 x 256
    out = model(_images(2, h, w))
    q = VARIANT_QUERIES[variant]
    assert out["pred_logits"].shape == (2, q, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (2, q, math.ceil(h / 2), math.ceil(w / 2))
    assert len(out["aux_outputs"]) == VARIANT_LAYERS[variant]
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, NUM_CLASSES + 1)
        assert aux["pred_masks"].shape == (2, q, math.ceil(h / 4), math.ceil(w / 4))
    if pixel_decoder == "hr":
        assert out["pred_edge"].shape == (2, 1, math.ceil(h / 2), math.ceil(w / 2))
    else:
        assert out["pred_edge"] is None
    tensors = [out["pred_logits"], out["pred_masks"]] + [t for a in out["aux_outputs"] for t in a.values()]
    if out["pred_edge"] is not None:
        tensors.append(out["pred_edge"])
    assert all(torch.isfinite(t).all() for t in tensors)

    loss = sum(t.float().sigmoid().mean() for t in tensors)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    # Frozen BN affines in the backbone get no gradient; the heads and the decoder do.
    assert model.backbone.bn1.weight.grad is None and not model.backbone.bn1.weight.requires_grad
    assert grads["transformer_decoder.class_embed.weight"].abs().sum() > 0
    assert grads["backbone.conv1.weight"].abs().sum() > 0
    if pixel_decoder == "hr":
        # Zero-initialised offset convs still receive gradient through the bilinear sampling.
        assert grads["pixel_decoder.lse.dcn_branch.offset_conv.weight"].abs().sum() > 0
        assert grads["pixel_decoder.rfb.branches.3.offset_conv.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    ("variant", "pixel_decoder"),
    [(v, d) for v in MASSFORMER_VARIANTS for d in MASSFORMER_PIXEL_DECODERS]
    + [("mask2former_tiny", None), ("maskformer_tiny", None)],  # the r50 baselines are only built on meta
)
def test_eval_deterministic(variant: str, pixel_decoder: str) -> None:
    model = _build(variant, pixel_decoder).eval()
    x = _images(1, 45, 70, seed=1)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_masks"], b["pred_masks"])
    pairs = zip(a["aux_outputs"], b["aux_outputs"], strict=True)
    assert all(torch.equal(p["pred_masks"], q["pred_masks"]) for p, q in pairs)
    assert torch.isfinite(a["pred_masks"]).all()


def test_running_stats_update_in_train_mode() -> None:
    model = build_massformer_tiny(NUM_CLASSES).train()
    before = model.backbone.bn1.running_mean.clone()
    model(_images(2, 64, 64))
    assert not torch.equal(before, model.backbone.bn1.running_mean)


@pytest.mark.parametrize("pixel_decoder", MASSFORMER_PIXEL_DECODERS)
def test_internal_padding_is_zero_in_normalized_space(pixel_decoder: str) -> None:
    """Cropped outputs of an odd image equal the top-left of a run on the image padded with the mean."""
    model = _build("tiny", pixel_decoder).eval()
    h, w = 101, 77
    x = _images(1, h, w, seed=2)
    padded = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 256, 256).clone()
    padded[:, :, :h, :w] = x
    with torch.no_grad():
        small, full = model(x), model(padded)
    h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
    torch.testing.assert_close(small["pred_masks"], full["pred_masks"][..., :h2, :w2], rtol=0, atol=1e-5)
    torch.testing.assert_close(small["pred_logits"], full["pred_logits"], rtol=0, atol=1e-5)
    if pixel_decoder == "hr":
        torch.testing.assert_close(small["pred_edge"], full["pred_edge"][..., :h2, :w2], rtol=0, atol=1e-5)


def test_semantic_probs_and_predict_match_reference_inference() -> None:
    """Chunked inference equals: upsample padded masks to the padded size, einsum, crop (the reference)."""
    model = _build("tiny", "hr").eval()
    h, w = 101, 77
    x = _images(2, h, w, seed=3)
    padded = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 256, 256).clone()
    padded[:, :, :h, :w] = x
    with torch.no_grad():
        out = model(padded)
        masks = F.interpolate(out["pred_masks"], size=(256, 256), mode="bilinear", align_corners=False)
        ref = torch.einsum("bqk,bqhw->bkhw", out["pred_logits"].softmax(-1)[..., :-1], masks.sigmoid())
        ref = ref[..., :h, :w]
    probs = model.semantic_probs(x, chunk_rows=7)
    assert probs.shape == (2, NUM_CLASSES, h, w)
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.semantic_probs(x), probs, rtol=0, atol=1e-6)
    labels = model.predict(x, chunk_rows=5)
    assert labels.dtype == torch.int64 and labels.shape == (2, h, w)
    assert torch.equal(labels, probs.argmax(dim=1))


def test_predict_sliding_window_averages_tiles() -> None:
    model = _build("tiny", "hr").eval()
    h, w = 200, 300
    x = _images(1, h, w, seed=4)
    # window 256, stride 192: tiles start at x = 0 and x = 44 (flush with the right edge), full height.
    left = model.semantic_probs(x[..., :, 0:256])
    right = model.semantic_probs(x[..., :, 44:300])
    scores = torch.zeros(1, NUM_CLASSES, h, w)
    counts = torch.zeros(1, 1, h, w)
    scores[..., 0:256] += left
    counts[..., 0:256] += 1
    scores[..., 44:300] += right
    counts[..., 44:300] += 1
    expected = (scores / counts).argmax(dim=1)
    assert torch.equal(model.predict(x, window=256, stride=192), expected)
    # A window that covers the whole image is whole-image inference.
    assert torch.equal(model.predict(x, window=512), model.predict(x))


def test_test_scale_runs_the_network_on_the_resized_image() -> None:
    """At scale s the scores are those of the image resized by s, resized back; predict follows test_scale."""
    model = _build("tiny", "hr").eval()
    h, w = 57, 83
    x = _images(1, h, w, seed=5)
    big = F.interpolate(x, size=(round(h * 2), round(w * 2)), mode="bilinear", align_corners=False)
    expected = F.interpolate(model.semantic_probs(big), size=(h, w), mode="bilinear", align_corners=False)
    probs = model.semantic_probs(x, scale=2.0)
    assert probs.shape == (1, NUM_CLASSES, h, w)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert torch.equal(model.predict(x, scale=2.0), probs.argmax(dim=1))
    assert (probs - model.semantic_probs(x)).abs().max() > 1e-3  # scale 1 is another prediction
    model.test_scale = 2.0  # what a trained model's config.json sets
    torch.testing.assert_close(model.semantic_probs(x), probs, rtol=0, atol=0)
    assert torch.equal(model.predict(x), probs.argmax(dim=1))
    assert torch.equal(model.predict(x, scale=1.0), model.semantic_probs(x, scale=1.0).argmax(dim=1))
    assert model.predict(x, window=32).shape == (1, h, w)  # each window at the model's scale
    with pytest.raises(ValueError, match="test scale > 0"):
        model.predict(x, scale=0.0)


def test_test_window_tiles_images_larger_than_it() -> None:
    """With test_window (network pixels) the default prediction slides tiles of test_window / scale input
    pixels over larger images, and stays whole-image on smaller ones; window=0 asks for the whole image."""
    model = _build("tiny", "hr").eval()
    x = _images(1, 70, 150, seed=6)
    whole, whole_scores = model.predict(x), model.semantic_probs(x)
    model.test_window = 64
    assert model.default_window((70, 150)) == 64 and model.default_window((64, 64)) is None
    tiled = model.sliding_probs(x, window=64)
    torch.testing.assert_close(model.scores(x), tiled, rtol=0, atol=0)
    assert torch.equal(model.predict(x), tiled.argmax(dim=1))
    assert (tiled - whole_scores).abs().max() > 1e-4  # tiles see less context: other scores
    assert torch.equal(model.predict(x, window=0), whole)
    model.test_scale = 2.0  # tiles of 32 input pixels, each run at 64 x 64
    assert model.default_window((70, 150)) == 32
    assert torch.equal(model.predict(x), model.sliding_probs(x, window=32, scale=2.0).argmax(dim=1))
    assert model.default_window((30, 20)) is None


def test_test_ratios_average_the_normalised_scores_of_each_scale() -> None:
    """With several test_ratios, scores/predict average the per-pixel class probabilities (normalised to sum
    1) at test_scale x each ratio, each in the model's own tiles; an explicit scale or window is one pass."""
    model = _build("tiny", "hr").eval()
    x = _images(1, 40, 90, seed=7)  # 2 x 4 tiles of 64 at scale 2, 3 x 6 at scale 3
    model.test_scale, model.test_window = 2.0, 64
    single = model.scores(x)
    model.test_ratios = (1.0, 1.5)
    per_scale = [model.scores(x, scale=s) for s in (2.0, 3.0)]
    expected = sum(p / p.sum(dim=1, keepdim=True) for p in per_scale) / 2
    torch.testing.assert_close(model.scores(x), expected, rtol=0, atol=1e-6)
    assert torch.equal(model.predict(x), expected.argmax(dim=1))
    assert (expected - single / single.sum(dim=1, keepdim=True)).abs().max() > 1e-4  # the second scale counts
    torch.testing.assert_close(model.scores(x, scale=2.0), single, rtol=0, atol=0)  # explicit: one scale
    assert torch.equal(model.predict(x, scale=3.0), per_scale[1].argmax(dim=1))
    assert torch.equal(model.predict(x, window=0), model.semantic_probs(x).argmax(dim=1))
    model.test_ratios = (1.5,)  # one ratio: that scale alone, as `addclass predict` runs it
    torch.testing.assert_close(model.scores(x), per_scale[1] / per_scale[1].sum(dim=1, keepdim=True),
                               rtol=0, atol=1e-6)
    assert torch.equal(model.predict(x), per_scale[1].argmax(dim=1))


def test_hr_training_needs_two_images() -> None:
    """BatchNorm on globally pooled features (SEB, conv_avg) cannot train on one image; eval mode can."""
    model = build_massformer_tiny(NUM_CLASSES).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(_images(1, 64, 64))
    model.eval()
    assert model(_images(1, 64, 64))["pred_masks"].shape[0] == 1


def test_rejects_bad_input_shape() -> None:
    model = build_massformer_tiny(NUM_CLASSES)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.rand(1, 1, 64, 64))


def test_fully_masked_queries_attend_everywhere() -> None:
    """A query whose mask is negative everywhere must not produce NaNs (Mask2Former's all-masked fallback)."""
    torch.manual_seed(0)
    decoder = MaskedTransformerDecoder(num_classes=3, hidden_dim=32, num_queries=4, num_heads=4, ffn_dim=64)
    last = decoder.mask_embed[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1.0)  # every query embedding is -1, features are positive -> all mask logits < 0
        mask_features = torch.rand(1, 32, 16, 16) + 0.1
        memories = [torch.randn(1, 32, s, s) for s in (2, 4, 8)]
        predictions = decoder(mask_features, memories, mask_stride=2)
    assert len(predictions) == 7
    assert (predictions[0][1] < 0).all()
    assert all(torch.isfinite(logits).all() and torch.isfinite(masks).all() for logits, masks in predictions)


# --- deformable convolution -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "h", "w"),
    [(6, 4, 3, 9, 11), (4, 6, 3, 9, 11), (8, 3, 7, 6, 5), (5, 5, 1, 4, 7), (3, 4, 3, 1, 1), (3, 2, 5, 1, 6)],
)
def test_cpu_deform_conv_paths_match_torchvision(c_in: int, c_out: int, k: int, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(k * 100 + h)
    x = torch.randn(2, c_in, h, w, generator=g, dtype=torch.float64)
    offset = 3 * torch.randn(
        2, 2 * k * k, h, w, generator=g, dtype=torch.float64
    )  # many samples fall outside
    mask = torch.rand(2, k * k, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, offset, mask, weight)]

    ref = deform_conv2d(*inputs, padding=k // 2, impl="torchvision")
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), inputs)
    for impl in ("grid_sample", "embedding_bag"):
        out = deform_conv2d(*inputs, padding=k // 2, impl=impl)
        grads = torch.autograd.grad(out.pow(2).sum(), inputs)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    # The one-tap-at-a-time grid-sample path (no gradient, "large" map) gives the same values.
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("addclass.models.massformer.deform.LOW_MEMORY_BYTES", 0)
        torch.testing.assert_close(deform_conv2d(x, offset, mask, weight, padding=k // 2), ref.detach())


def test_inference_paths_agree_in_full_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """No-grad CPU inference (embedding-bag DCN) equals the training-path (grid-sample) forward."""
    model = _build("tiny", "hr").eval()
    x = _images(1, 64, 96, seed=5)
    with torch.no_grad():
        for module in model.modules():  # non-zero, fractional offsets and masks != 0.5
            if isinstance(module, DeformLayer):
                module.offset_conv.weight.normal_(0.0, 0.05)
        monkeypatch.setattr("addclass.models.massformer.deform.EMBEDDING_BAG_MIN_PIXELS", 0)
        fast = model(x)
        monkeypatch.setattr("addclass.models.massformer.deform.EMBEDDING_BAG_MIN_PIXELS", 2**62)
        ref = model(x)
    torch.testing.assert_close(fast["pred_masks"], ref["pred_masks"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast["pred_edge"], ref["pred_edge"], rtol=1e-4, atol=1e-4)


def test_deform_layer_starts_as_half_weighted_conv() -> None:
    """Zero-initialised offsets and mask logits: DCNv2 equals a plain conv with weights x sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    layer = DeformLayer(in_channels=5, out_channels=6, kernel_size=3).eval()
    x = torch.randn(2, 5, 12, 10)
    with torch.no_grad():
        got = layer(x)
        expected = layer.relu(layer.norm(F.conv2d(x, 0.5 * layer.weight, padding=1)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_deform_layer_upsample_returns_both_resolutions() -> None:
    layer = DeformLayer(in_channels=4, out_channels=4, kernel_size=3, upsample=True).eval()
    d, up = layer(torch.randn(1, 4, 8, 6))
    assert d.shape == (1, 4, 8, 6) and up.shape == (1, 4, 16, 12)


# --- smaller blocks ---------------------------------------------------------------------------------------


def test_sine_position_encoding_values() -> None:
    pos = sine_position_encoding(2, 2, num_feats=2, eps=0.0)
    assert pos.shape == (1, 4, 2, 2)
    # num_feats = 2: one frequency (dim_t = 1); y = (1, 2) / 2 * 2pi = (pi, 2pi);
    # channels are (sin y, cos y, sin x, cos x).
    expected_y = torch.tensor(
        [[math.sin(math.pi), math.cos(math.pi)], [math.sin(2 * math.pi), math.cos(2 * math.pi)]]
    )
    torch.testing.assert_close(pos[0, :2, :, 0].T, expected_y.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(pos[0, 2:, 0, :].T, expected_y.float(), rtol=0, atol=1e-6)
    assert sine_position_encoding(16, 16, num_feats=64).shape == (1, 128, 16, 16)


def test_window_partition_roundtrip_and_order() -> None:
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    tokens = window_partition(x, 4)
    assert tokens.shape == (2 * 2 * 3, 16, 3)
    # Second window of the first image = rows 0..3, columns 4..7; token order is row-major inside the window.
    torch.testing.assert_close(tokens[1, :, 0], x[0, 0, 0:4, 4:8].reshape(-1))
    torch.testing.assert_close(window_reverse(tokens, 4, 8, 12), x)


def test_seb_double_sigmoid_gate_range() -> None:
    torch.manual_seed(0)
    seb = SEB(channels=8).eval()
    x = torch.rand(2, 8, 5, 5) + 0.1
    with torch.no_grad():
        ratio = seb(x) / x
    assert (ratio > 1.5).all() and (ratio < 1 + 1 / (1 + math.exp(-1)) + 1e-6).all()


def test_a_batch_one_window_wide_at_stride_16_predicts() -> None:
    """320 x 256 pads to 512 x 256: the stride-16 map is one window wide, and window_reverse then hands the
    deformable layer a non-contiguous tensor (it crashed with "view size is not compatible")."""
    from addclass.models.build import MODEL_BUILDERS

    model = MODEL_BUILDERS["tiny"](num_classes=7).eval()
    assert model.semantic_probs(torch.rand(2, 3, 320, 256) * 255).shape == (2, 7, 320, 256)
