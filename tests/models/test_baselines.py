"""The Mask2Former and MaskFormer baselines (docs/design.md §1.8): shapes, training with the real criterion,
state-dict round trips, parameter counts, the deformable-attention sampling op, weights and model folders.

Real forwards use the tiny variants; the r50 baselines are only ever built on the meta device."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet50

from addclass.common.errors import InputError
from addclass.models.build import BASELINE_PIXEL_DECODERS, MODEL_BUILDERS, model_info
from addclass.models.mask2former.msdeform_decoder import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    ms_deform_attn_sample,
)
from addclass.models.maskformer.detr_decoder import StandardTransformerDecoder
from addclass.models.massformer.model import MaSSFormer
from addclass.models.parts.transformer_decoder import MaskedTransformerDecoder
from addclass.models.training.criterion import build_criterion
from addclass.models.training.targets import build_targets
from addclass.models.weights import load_backbone_checkpoint

K = 5
TINY = ("mask2former_tiny", "maskformer_tiny")
# Predictions per forward: Mask2Former predicts from the initial queries and after every layer, MaskFormer after
# every layer only; the last one is ``pred_masks``, the others ``aux_outputs``.
TINY_AUX = {"mask2former_tiny": 3, "maskformer_tiny": 2}
TINY_QUERIES = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread keeps these tests' time predictable
    yield
    torch.set_num_threads(n)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0


def _build(variant: str, seed: int = 0) -> MaSSFormer:
    torch.manual_seed(seed)
    return MODEL_BUILDERS[variant](K)


@pytest.mark.parametrize("variant", TINY)
def test_forward_shapes_at_an_odd_size(variant: str) -> None:
    model = _build(variant).train()
    h, w = 200, 328  # pads to 224 x 352 (multiples of 32)
    out = model(_images(2, h, w))
    assert out["pred_logits"].shape == (2, TINY_QUERIES, K + 1)
    assert out["pred_masks"].shape == (2, TINY_QUERIES, math.ceil(h / 2), math.ceil(w / 2))
    assert len(out["aux_outputs"]) == TINY_AUX[variant]
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, TINY_QUERIES, K + 1)
        assert aux["pred_masks"].shape == (2, TINY_QUERIES, math.ceil(h / 4), math.ceil(w / 4))
    assert out["pred_edge"] is None
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()
    model.eval()
    assert model.predict(_images(1, h, w)).shape == (1, h, w)


@pytest.mark.parametrize("variant", TINY)
def test_training_step_with_the_set_criterion(variant: str) -> None:
    model = _build(variant).train()
    h, w = 64, 96
    labels = torch.zeros(2, h, w, dtype=torch.uint8)
    labels[0, : h // 2] = 1
    labels[0, h // 2 :, w // 3 :] = 4  # pseudo class
    labels[1, :, w // 2 :] = 2
    labels[1, :3, :3] = 255
    targets = [build_targets(m, pseudo_classes={4}) for m in labels]
    criterion = build_criterion(num_classes=K, num_points=256, reweight="inverse")
    losses = criterion(model(_images(2, h, w)), targets, generator=torch.Generator().manual_seed(0))
    assert "loss_edge" not in losses  # no edge head: the criterion skips the edge loss
    assert {f"loss_dice_{i}" for i in range(TINY_AUX[variant])} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())  # type: ignore[arg-type]
    assert not model.backbone.bn1.weight.requires_grad  # frozen BN affines, as in MaSSFormer
    if variant.startswith("mask2former"):
        # The deformable offsets start at zero weight and still learn through the bilinear sampling.
        offsets = model.pixel_decoder.encoder[0].self_attn.sampling_offsets.weight  # type: ignore[index,union-attr]
        assert offsets.grad is not None and offsets.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", TINY)
def test_state_dict_round_trip_gives_identical_outputs(variant: str) -> None:
    model = _build(variant, seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = _build(variant, seed=1).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = _images(1, 70, 90, seed=2)
    with torch.no_grad():
        a, b = model(x), other(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_masks"], b["pred_masks"])


# Counted by hand from the R50 semantic configs (docs/design.md §1.8), K = 7, all parameters incl. frozen BN
# affines. MaSS13K paper Tab. 2: Mask2Former R50 44.01M, MaskFormer R50 41.31M.
R50_COUNTS = {
    "mask2former_r50": {
        "total": 44_004_616,
        "components": {
            "backbone": 23_508_032,
            "pixel_decoder": 6_035_904,
            "transformer_decoder": 14_209_280,  # 9 x 1,578,752 + decoder norm 512
            "heads": 251_400,
        },
        "pixel_decoder_parts": {
            "input_projections": 919_808,  # 1x1 conv + GN of C5, C4, C3
            "encoder": 4_393_152,  # 6 x (MSDeformAttn 205,600 + FFN 525,568 + 2 LN 1,024)
            "level_embed": 768,
            "lateral": 66_048,
            "output": 590_336,
            "mask_features": 65_792,
        },
        "paper": 44.01e6,
    },
    "maskformer_r50": {
        "total": 41_271_112,
        "components": {
            "backbone": 23_508_032,
            "pixel_decoder": 7_540_480,
            "transformer_decoder": 9_997_568,  # C5 projection 524,544 + 6 x 1,578,752 + decoder norm 512
            "heads": 225_032,  # query embedding 25,600 + class head 2,056 + mask MLP 197,376
        },
        "pixel_decoder_parts": {"lateral": 460_288, "output": 6_490_112, "mask_features": 590_080},
        "paper": 41.31e6,
    },
}


@pytest.mark.parametrize("variant", sorted(R50_COUNTS))
def test_r50_parameter_counts(variant: str) -> None:
    info = model_info(variant, num_classes=7)  # built on the meta device
    expected = R50_COUNTS[variant]
    assert info["total"] == expected["total"]
    assert info["components"] == expected["components"]
    assert info["pixel_decoder_parts"] == expected["pixel_decoder_parts"]
    assert abs(info["total"] - expected["paper"]) / expected["paper"] < 0.01  # type: ignore[operator]
    assert info["pixel_decoder"] == BASELINE_PIXEL_DECODERS[variant]
    assert info["total"] - info["trainable"] == 53_120  # the backbone's frozen BN affines


def test_r50_structure_matches_the_configs() -> None:
    with torch.device("meta"):
        m2f = MODEL_BUILDERS["mask2former_r50"](7)
        mf = MODEL_BUILDERS["maskformer_r50"](7)
    assert isinstance(m2f.pixel_decoder, MSDeformAttnPixelDecoder) and m2f.size_divisor == 32
    assert len(m2f.pixel_decoder.encoder) == 6
    attns = [m for m in m2f.pixel_decoder.modules() if isinstance(m, MSDeformAttn)]
    assert len(attns) == 6 and (attns[0].num_heads, attns[0].num_levels, attns[0].num_points) == (8, 3, 4)
    td = m2f.transformer_decoder
    assert isinstance(td, MaskedTransformerDecoder) and len(td.layers) == 9 and td.num_queries == 100
    assert any(isinstance(m, torch.nn.ReLU) for m in td.layers.modules())  # Mask2Former's FFN (MaSSFormer: GELU)
    assert not any(isinstance(m, torch.nn.GELU) for m in td.layers.modules())
    assert isinstance(mf.transformer_decoder, StandardTransformerDecoder) and mf.size_divisor == 32
    assert len(mf.transformer_decoder.layers) == 6 and mf.num_queries == 100
    dropouts = [m.p for m in mf.transformer_decoder.layers.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.1}


def test_ms_deform_attn_sample_reads_pixel_centres_and_weights_them() -> None:
    # One image, one query, one head of 2 channels, one 3 x 4 level, 3 points.
    value_map = torch.arange(24, dtype=torch.float32).view(2, 3, 4)  # Dh x h x w
    value = value_map.flatten(1).t().reshape(1, 12, 1, 2)  # B x S x heads x Dh
    centres = [(1, 2), (2, 0)]  # (row, col)
    loc = [[(c + 0.5) / 4, (r + 0.5) / 3] for r, c in centres]
    loc.append([1.2, 0.5])  # outside the map: reads zeros
    locations = torch.tensor(loc).view(1, 1, 1, 1, 3, 2)  # B x Nq x heads x L x P x 2
    weights = torch.tensor([0.25, 0.5, 0.25]).view(1, 1, 1, 1, 3)
    out = ms_deform_attn_sample(value, [(3, 4)], locations, weights)  # B x Nq x Dh
    expected = 0.25 * value_map[:, 1, 2] + 0.5 * value_map[:, 2, 0]
    torch.testing.assert_close(out.view(2), expected)
    # Half-way between two horizontal neighbours: their mean.
    locations = torch.tensor([(1 + 1.0) / 4, (0 + 0.5) / 3]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_sample(value, [(3, 4)], locations, torch.ones(1, 1, 1, 1, 1))
    torch.testing.assert_close(out.view(2), (value_map[:, 0, 1] + value_map[:, 0, 2]) / 2)


def _bilinear_read(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """C x h x w image at normalised (x, y), pixel centres at (i + 0.5) / size, zeros outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = torch.zeros(img.shape[0])
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * img[:, yy, xx]
    return total


def test_ms_deform_attn_sample_matches_a_loop_over_heads_levels_and_points() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3), (4, 5)]
    b, nq, heads, dh, points = 2, 3, 2, 3, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, dh, generator=g)
    locations = torch.rand(b, nq, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(b, nq, heads, len(shapes), points, generator=g)
    out = ms_deform_attn_sample(value, shapes, locations, weights)  # B x Nq x (heads Dh)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for i in range(b):
        for q in range(nq):
            for m in range(heads):
                expected = torch.zeros(dh)
                for level, (h, w) in enumerate(shapes):
                    tokens = value[i, starts[level] : starts[level] + h * w, m]  # hw x Dh
                    img = tokens.t().reshape(dh, h, w)
                    for p in range(points):
                        x, y = locations[i, q, m, level, p].tolist()
                        expected += weights[i, q, m, level, p] * _bilinear_read(img, x, y)
                torch.testing.assert_close(out[i, q, m * dh : (m + 1) * dh], expected, rtol=1e-5, atol=1e-5)


def test_ms_deform_attn_starts_with_rings_of_points_and_uniform_weights() -> None:
    attn = MSDeformAttn(dim=16, num_levels=2, num_heads=4, num_points=3)
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)  # heads x L x P x (x, y)
    torch.testing.assert_close(offsets[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(offsets[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)  # 90 degrees
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


@pytest.mark.parametrize("variant", sorted(BASELINE_PIXEL_DECODERS))
def test_a_baseline_refuses_another_pixel_decoder(variant: str) -> None:
    from addclass.tasks.training.train_config import TrainConfig

    own = BASELINE_PIXEL_DECODERS[variant]
    other = "hr"
    with pytest.raises(InputError, match="pixel_decoder") as err:
        MODEL_BUILDERS[variant](K, pixel_decoder=other)
    assert "\n" not in str(err.value) and variant in str(err.value) and repr(own) in str(err.value)
    with pytest.raises(InputError, match="pixel_decoder"):
        model_info(variant, num_classes=K, pixel_decoder=other)
    with pytest.raises(InputError, match="pixel_decoder"):
        TrainConfig(store="s", out_dir="o", variant=variant, pixel_decoder=other)
    assert TrainConfig(store="s", out_dir="o", variant=variant).pixel_decoder == own
    assert TrainConfig(store="s", out_dir="o", variant=variant, pixel_decoder=own).pixel_decoder == own
    with pytest.raises(InputError, match="pixel_decoder"):
        MODEL_BUILDERS["tiny"](K, pixel_decoder="msdeform")  # and MaSSFormer does not take theirs


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("variant", ["mask2former_r50", "maskformer_r50"])
def test_r50_backbones_load_the_torchvision_resnet50_layout(tmp_path: Path, variant: str) -> None:
    # A resnet50-0676ba61.pth stand-in: every tensor of torchvision's ResNet-50 (fc included) with its real name
    # and shape, stored as an expanded scalar (a 100 kB file); the model is on the meta device.
    with torch.device("meta"):
        ref = resnet50(weights=None).state_dict()
        model = MODEL_BUILDERS[variant](7)
    fake = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in ref.items()}
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(fake, path)
    assert load_backbone_checkpoint(model, path) == ([], [])  # strict: every name and shape fits


@pytest.mark.parametrize("variant", TINY)
def test_tiny_backbones_load_resnet18_weights(tmp_path: Path, variant: str) -> None:
    torch.manual_seed(0)
    ref = resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)
    model = _build(variant)
    missing, unexpected = load_backbone_checkpoint(model, path, strict=False)  # one block per stage
    assert missing == [] and "layer1.1.conv1.weight" in unexpected
    assert torch.equal(model.backbone.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)


@pytest.mark.parametrize("variant", TINY)
def test_model_folder_of_a_baseline_builds_and_reloads(tmp_path: Path, variant: str) -> None:
    from addclass.tasks.model_files.model_folder import (
        FORMAT,
        FORMAT_VERSION,
        load_trained_model,
        read_model_config,
        save_model_dir,
    )

    model = _build(variant).eval()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": variant,
              "pixel_decoder": BASELINE_PIXEL_DECODERS[variant], "num_classes": K,
              "class_names": [f"c{i}" for i in range(K)]}
    folder = save_model_dir(tmp_path / "final", model=model, config=config, step=1)
    assert read_model_config(folder)["variant"] == variant
    loaded = load_trained_model(folder)
    x = _images(1, 40, 72, seed=3)
    assert torch.equal(loaded.predict(x), model.predict(x))
    # A folder naming another pixel decoder for a baseline is refused, naming the parameter.
    bad = save_model_dir(tmp_path / "bad", model=model, config={**config, "pixel_decoder": "hr"}, step=1)
    with pytest.raises(ValueError, match="pixel_decoder"):
        read_model_config(bad)


def test_model_info_cli_reports_components_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from addclass.cli import main as cli

    assert cli.main(["model-info", "maskformer_r50", "--macs-size", "256", "320", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total"] == R50_COUNTS["maskformer_r50"]["total"] and info["pixel_decoder"] == "fpn"
    assert info["macs"]["input_hw"] == [256, 320] and info["macs"]["grid_sample_macs_g"] == 0
    assert sum(info["macs"]["per_component_g"].values()) == pytest.approx(info["macs"]["macs_g"], abs=0.01)
    assert cli.main(["model-info", "maskformer_r50", "--pixel-decoder", "hr"]) == 2
    err = capsys.readouterr().err
    assert "pixel_decoder applies to the MaSSFormer variants only" in err and err.count("\n") == 1


@pytest.mark.parametrize(("variant", "paper_g"), [("mask2former_r50", 3123.0), ("maskformer_r50", 2396.0)])
def test_r50_macs_at_4k_near_the_paper(variant: str, paper_g: float) -> None:
    from addclass.models.macs import count_macs

    macs = count_macs(variant, height=4096, width=3072)  # meta device: no memory, no compute
    # The paper's figures are fvcore MACs, which skip the deformable-attention sampling (a custom op there).
    assert abs(macs["macs_excluding_sampling_g"] - paper_g) / paper_g < 0.01


@pytest.fixture(scope="module")
def train_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tasks.test_train import make_train_store

    return make_train_store(tmp_path_factory.mktemp("baselines") / "scenes.zarr")


@pytest.mark.parametrize("variant", TINY)
def test_train_task_trains_and_reloads_a_baseline(train_store: Path, tmp_path: Path, variant: str) -> None:
    from addclass.tasks.model_files.model_folder import load_trained_model, read_model_config
    from addclass.tasks.training.train import train
    from tests.tasks.test_train import tiny_config

    config = tiny_config(train_store, tmp_path / "run", variant=variant, iters=2, checkpoint_every=2)
    assert config.pixel_decoder == BASELINE_PIXEL_DECODERS[variant]
    final = train(config, progress=False)
    saved = read_model_config(final)
    assert saved["variant"] == variant and saved["pixel_decoder"] == BASELINE_PIXEL_DECODERS[variant]
    model = load_trained_model(final)
    assert model.predict(_images(1, 48, 64)).shape == (1, 48, 64)


@pytest.mark.parametrize("variant", TINY)
def test_onnx_export_of_a_baseline_matches_pytorch(tmp_path: Path, variant: str) -> None:
    from addclass.tasks.model_files.export_model import DEFAULT_ATOL, export_model
    from addclass.tasks.model_files.model_folder import FORMAT, FORMAT_VERSION, save_model_dir

    model = _build(variant).eval()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": variant,
              "pixel_decoder": BASELINE_PIXEL_DECODERS[variant], "num_classes": K,
              "class_names": [f"c{i}" for i in range(K)], "store_class_ids": list(range(K))}
    folder = save_model_dir(tmp_path / "final", model=model, config=config, step=1)
    # export_model checks the ONNX scores against PyTorch at two sizes other than the traced one (sizes stay
    # symbolic through the deformable attention's per-level normalisation).
    info = export_model(folder, tmp_path / "model.onnx", format="onnx")  # raises when they differ
    checks = info["verification"]["checks"]
    assert (tmp_path / "model.onnx").is_file() and len(checks) == 2
    assert all(c["max_abs_diff"] < DEFAULT_ATOL for c in checks)
