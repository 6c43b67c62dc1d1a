from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import pytest

from addclass.cli.main import main
from addclass.tasks.training.train_launch import Launch


def test_cli_ingest_and_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.zarr"
    assert main(["ingest", "synthetic", str(store), "--images", "4", "--size", "40", "56", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    assert list(summary["versions"]) == ["v1"]
    assert summary["hand_masks"]["eval"] == {"car": {"test": 1}}
    assert main(["inspect", str(store)]) == 0
    assert "lineage v1" in capsys.readouterr().out


def test_cli_overlay_png(tmp_path: Path, synthetic_store: Path) -> None:
    from addclass.storage.store import open_label_store

    image_id = open_label_store(synthetic_store).image_ids("val")[0]
    out = tmp_path / "o.png"
    assert main(["inspect", str(synthetic_store), "--image", image_id, "--png", str(out)]) == 0
    import cv2

    assert cv2.imread(str(out)).shape == (96, 128 * 3, 3)
    out.write_bytes(b"mine")
    assert main(["inspect", str(synthetic_store), "--image", image_id, "--png", str(out)]) == 2  # never silently
    assert out.read_bytes() == b"mine"
    assert main(["inspect", str(synthetic_store), "--image", image_id, "--png", str(out), "--overwrite"]) == 0
    assert cv2.imread(str(out)).shape == (96, 128 * 3, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/missing.zarr"], "No label store"),
        (["ingest", "camvid", "{tmp}/nothing", "{tmp}/x.zarr"], "Missing image folder"),
        (["inspect", "{store}", "--image", "nope", "--png", "{tmp}/o.png"], "Unknown image id 'nope'"),
        (["inspect", "{store}", "--image", "x", "--png", "{tmp}"], "Expected a .png file"),
        (["inspect", "{store}", "--image", "x", "--png", "{tmp}/o.txt"], "Expected a .png file"),
        (["discard-draft", "{store}", "v1"], "'v1' of"),
        (["train", "{store}", "--variant", "tiny", "--out", "{store}/zarr.json/run"], "Not a directory"),
        (["discard-draft", "{store}", "v9"], "No draft version 'v9'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, synthetic_store: Path, capsys: pytest.CaptureFixture[str],
                                 argv: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path, store=synthetic_store) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("addclass: error:") and message in err and "Traceback" not in err


def test_cli_fine_tunes_a_seven_class_model_on_the_new_class(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """ingest -> train on v1 -> pseudo-label + merge car -> train on v2 from the v1 model (--init-model)."""
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", "synthetic", store, "--images", "4", "--size", "64", "96", "--quiet"]) == 0
    small = ["--variant", "tiny", "--iters", "1", "--batch-size", "2", "--crop-size", "64", "--points", "64",
             "--workers", "0", "--device", "cpu", "--quiet"]
    assert main(["train", store, "--version", "v1", *small, "--out", str(tmp_path / "v1")]) == 0
    for split in ("train", "val"):
        assert main(["pseudo-label", store, "--prompt", "car", "--split", split, "--labeler", "simulated",
                     "--quiet"]) == 0
    assert main(["merge", store, "--classes", "car", "--allow-partial", "--quiet"]) == 0
    capsys.readouterr()
    base = tmp_path / "v1" / "final"
    assert main(["train", store, *small, "--out", str(tmp_path / "v2"), "--init-model", str(base)]) == 0
    assert f"model: {tmp_path / 'v2' / 'final'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "v2" / "final" / "config.json").read_text())
    assert config["class_names"][-1] == "car" and config["train_config"]["init_model"] == str(base)
    assert main(["train", store, *small, "--out", str(tmp_path / "v3"), "--init-model", str(tmp_path)]) == 2
    assert "is not a trained model folder" in capsys.readouterr().err
    # the v2 model's predictions on train as a label version, which inspect reads like a merge
    model = str(tmp_path / "v2")
    assert main(["predict", model, "--into-store", store, "--split", "train", "--quiet"]) == 0
    assert "label version v3 (parent v2, splits train): 2 images predicted" in capsys.readouterr().out
    assert main(["inspect", store]) == 0
    assert "version v3  lineage v3 <- v2 <- v1  policy predicted" in capsys.readouterr().out
    review = str(tmp_path / "review")  # the least sure car label out and back, unchanged, as a reviewed version
    assert main(["review", "export", store, review, "--class", "car", "--version", "v2", "--top", "1"]) == 0
    assert f"1 images of car (v2, by score) in {review}" in capsys.readouterr().out
    assert main(["review", "import", store, review]) == 0
    assert "label version v4 (parent v2, class car): 1 images reviewed" in capsys.readouterr().out
    assert main(["review", "export", store, review, "--class", "car", "--by", "disagreement"]) == 2
    assert "exists; pick a new folder" in capsys.readouterr().err
    assert main(["review", "export", store, review + "2", "--class", "car", "--by", "disagreement", "--model",
                 model, "--top", "2"]) == 0  # ranked against the v2 model's own car masks
    ranked = json.loads((Path(review + "2") / "manifest.json").read_text())["images"]
    assert [e["disagreement"] for e in ranked] == sorted((e["disagreement"] for e in ranked), reverse=True)
    capsys.readouterr()
    assert main(["review", "export", store, review + "3", "--class", "car", "--by", "uncertainty", "--model",
                 model, "--top", "2", "--format", "labelstudio"]) == 0  # the model's unsure car edges, for Label Studio
    printed = capsys.readouterr().out
    assert f"{review}3/labeling_config.xml" in printed and f"{review}3/reviewed.json" in printed
    ranked = json.loads((Path(review + "3") / "manifest.json").read_text())["images"]
    assert [e["uncertainty"] for e in ranked] == sorted((e["uncertainty"] for e in ranked), reverse=True)
    assert len(json.loads((Path(review + "3") / "tasks.json").read_text())) == 2
    assert main(["predict", model, "--into-store", store, "--out", str(tmp_path / "p")]) == 2
    assert "give no INPUT and no --out" in capsys.readouterr().err
    assert main(["predict", model, str(tmp_path), "--out", str(tmp_path / "p"), "--split", "train"]) == 2
    assert "--split goes with --into-store" in capsys.readouterr().err


def _subparser(command: str) -> argparse.ArgumentParser:
    from addclass.cli.args import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return cast(argparse.ArgumentParser, sub.choices[command])


def test_add_class_options_all_reach_the_flow_with_absolute_paths(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from addclass.cli.args import build_parser
    from addclass.cli.commands_flows import flow_params
    from addclass.flows.add_class import add_class

    monkeypatch.chdir(tmp_path)
    a = build_parser().parse_args(["add-class", "--prompt", "car", "--store", "s.zarr", "--max-boxes", "5",
                                   "--dtype", "bfloat16", "--workers", "0", "--init-model", "runs/m",
                                   "--sam-checkpoint", "~/w/sam.pth", "--runs-dir", "out"])
    kwargs = flow_params(a)
    inspect.signature(add_class.fn).bind(**kwargs)  # every option is a parameter of the flow
    labeling, training = kwargs["labeling"], kwargs["training"]
    assert (labeling.max_boxes, labeling.dtype, training.num_workers) == (5, "bfloat16", 0)
    # a deployment's worker runs elsewhere: paths go out absolute
    assert kwargs["store"] == str(tmp_path / "s.zarr") and kwargs["init_model"] == str(tmp_path / "runs" / "m")
    assert kwargs["runs_dir"] == str(tmp_path / "out")
    assert labeling.sam_checkpoint == str(Path("~/w/sam.pth").expanduser())
    champion = build_parser().parse_args(["add-class", "--prompt", "car", "--store", "s", "--init-model", "champion"])
    assert flow_params(champion)["init_model"] == "champion" and flow_params(champion)["review"] is None
    paused = build_parser().parse_args(["add-class", "--prompt", "car", "--store", "s", "--review-top", "5",
                                        "--review-by", "uncertainty", "--review-model", "champion",
                                        "--review-format", "labelstudio", "--review-out", "rev"])
    review = flow_params(paused)["review"]
    assert (review.top, review.by, review.model, review.format) == (5, "uncertainty", "champion", "labelstudio")
    assert review.out == str(tmp_path / "rev")


@pytest.mark.parametrize(("command", "flow_module", "flow_name"), [("add-class", "addclass.flows.add_class", "add_class"),
                                                                   ("retrain", "addclass.flows.retrain", "retrain")])
def test_every_flow_parameter_has_one_flag_with_its_default(command: str, flow_module: str, flow_name: str) -> None:
    """A top-level flow parameter the CLI cannot set, a flag that reaches no parameter, or a flag whose default
    is not the flow's, fails here (the fields of the parameter objects: tests/flows/test_settings_single_source.py)."""
    import importlib
    import inspect

    from addclass.cli.args import FLOW_GROUPS
    from addclass.cli.commands_flows import FLOW_CONTROL, FLOW_PATHS

    flow = getattr(importlib.import_module(flow_module), flow_name)
    params = inspect.signature(flow.fn, eval_str=True).parameters
    expected = {name: p.default for name, p in params.items() if name not in FLOW_GROUPS}
    actions = [a for a in _subparser(command)._actions
               if a.dest not in FLOW_CONTROL and a.dest != "help" and "." not in a.dest]
    assert sorted(a.dest for a in actions) == sorted(expected)  # one flag each, and no flag that reaches nothing
    assert set(_subparser(command).get_default("flow_groups")) == set(params) & set(FLOW_GROUPS)
    for action in actions:
        if action.required or action.dest in FLOW_PATHS:
            continue  # prompt, store; paths are made absolute
        default = expected[action.dest]
        assert action.default == (list(default) if isinstance(default, tuple) else default), action.dest


@pytest.mark.parametrize(("command", "flow_module", "flow_name"), [("add-class", "addclass.flows.add_class", "add_class"),
                                                                   ("retrain", "addclass.flows.retrain", "retrain")])
def test_flag_choices_are_the_parameter_choices(command: str, flow_module: str, flow_name: str) -> None:
    """A top-level flag with choices offers exactly the values its parameter accepts."""
    import importlib
    import inspect
    from typing import get_args

    flow = inspect.signature(getattr(importlib.import_module(flow_module), flow_name).fn, eval_str=True).parameters
    for action in _subparser(command)._actions:
        if action.choices is None or action.dest == "help" or "." in action.dest:
            continue
        annotation = flow[action.dest].annotation
        literal = next((a for a in get_args(annotation) if get_args(a)), annotation)  # X | None -> X
        assert set(action.choices) == set(get_args(literal)), action.dest


def test_flags_set_the_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from addclass.cli.args import build_parser
    from addclass.cli.commands_flows import flow_params
    from addclass.flows.params import ReviewParams, TrainingParams

    monkeypatch.chdir(tmp_path)
    flags = build_parser().parse_args(["add-class", "--prompt", "car", "--store", "s", "--no-inverse-near-pseudo",
                                       "--pseudo-splits", "train", "--eval-splits", "test", "--pseudo-batch-size",
                                       "3", "--recipe", "paper", "--scale-range", "1", "2", "--test-scale", "2",
                                       "--checkpoint-every", "7", "--train-batch-size", "4", "--points", "9",
                                       "--device", "cuda", "--seed", "5", "--labeler", "simulated", "--sam",
                                       "vit_h", "--dino", "swinb", "--wait"])
    got = flow_params(flags)
    labeling, training = got["labeling"], got["training"]
    assert (training.inverse_weight_near_pseudo, labeling.splits, got["eval_splits"], labeling.batch_size,
            training.recipe, training.scale_range, training.test_scale) == (False, ["train"], ["test"], 3, "paper",
                                                                            (1.0, 2.0), 2.0)
    assert (training.checkpoint_every, training.batch_size, training.num_points, training.device,
            training.seed) == (7, 4, 9, "cuda", 5)
    assert (labeling.kind, labeling.sam_variant, labeling.dino_config, got["wait_for_lock"]) == (
        "simulated", "vit_h", "swinb", True)
    retrain = flow_params(build_parser().parse_args(["retrain", "--store", "s", "--iters", "7", "--promote",
                                                     "never", "--version", "v2"]))
    assert set(retrain) == {"store", "version", "training", "init_model", "eval_splits", "promote", "runs_dir",
                            "wait_for_lock"}
    assert retrain["training"] == TrainingParams(iters=7) and retrain["promote"] == "never"
    # a review flag alone pauses for review, with the other review fields at their defaults
    paused = flow_params(build_parser().parse_args(["add-class", "--prompt", "car", "--store", "s", "--review-by",
                                                    "uncertainty", "--review-model", "champion"]))
    assert paused["review"] == ReviewParams(by="uncertainty", model="champion")


def test_deployment_parameters_are_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import addclass.cli.commands_flows as flow_commands
    import addclass.cli.main as cli

    sent: dict[str, Any] = {}
    def submit(name: str, params: dict[str, Any], timeout: float | None) -> int:
        sent.update(name=name, params=params)
        return 0

    monkeypatch.setattr(flow_commands, "_run_deployment", submit)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["add-class", "--prompt", "car", "--store", "s", "--iters", "600", "--deployment"]) == 0
    params = sent["params"]
    assert sent["name"] == "add-class/add-class" and json.loads(json.dumps(params)) == params
    assert params["training"]["iters"] == 600 and params["labeling"]["kind"] == "grounded-sam"
    assert "init_model" not in params and params["store"] == str(tmp_path / "s")


@pytest.mark.parametrize(("extra", "message"), [
    (["--prompt", "Sky"], "names class 'sky', which already exists"),
    (["--prompt", "car", "--iters", "0"], "training.iters: Input should be greater than or equal to 1"),
    (["--prompt", "car", "--eval-splits", "valid"], "eval_splits"),
    (["--prompt", "car", "--recipe", "paper", "--test-scale", "0"], "test_scale > 0"),
])
def test_add_class_parameter_errors_come_before_prefect_starts(synthetic_store: Path, extra: list[str],
                                                               message: str, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import addclass.flows.add_class as add_class_module

    started: list[object] = []
    monkeypatch.setattr(add_class_module, "add_class", lambda **kw: started.append(kw))  # the flow (and Prefect)
    assert main(["add-class", "--store", str(synthetic_store), "--labeler", "simulated", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("addclass: error:") and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and started == []  # refused before the flow, so before Prefect's API starts


def _owner_choices() -> dict[str, tuple[str, ...]]:
    """The lists of the modules that own the choices (they load torch), by the `flows.choices` Literal or the
    `cli.args` tuple that must equal them."""
    from addclass.models.build import MODEL_BUILDERS, PIXEL_DECODERS
    from addclass.models.labelers.build import LABELER_KINDS
    from addclass.models.labelers.grounded_sam_weights import DINO_VARIANTS
    from addclass.models.labelers.sam_engines import SAM_VARIANTS
    from addclass.models.training.loss_weights import REWEIGHT_MODES
    from addclass.models.training.optim import RECIPE_CHOICES
    from addclass.tasks.labels.merge_plan import POLICIES
    from addclass.tasks.labels.review import FORMATS, RANKINGS
    from addclass.tasks.prediction.predict import PREDICT_MODES

    return {"RecipeChoice": RECIPE_CHOICES, "ModelVariant": tuple(MODEL_BUILDERS), "PIXEL_DECODERS": PIXEL_DECODERS,
            "ReweightChoice": REWEIGHT_MODES, "MergePolicy": POLICIES, "SamVariant": tuple(SAM_VARIANTS),
            "DinoConfig": tuple(DINO_VARIANTS), "PredictMode": PREDICT_MODES, "ReviewRanking": RANKINGS,
            "ReviewFormat": FORMATS, "LabelerKind": LABELER_KINDS}


@pytest.mark.parametrize("name", ["RecipeChoice", "ModelVariant", "PIXEL_DECODERS", "ReweightChoice", "MergePolicy",
                                  "SamVariant", "DinoConfig", "PredictMode", "ReviewRanking", "ReviewFormat",
                                  "LabelerKind"])
def test_cli_choices_are_their_owners_lists(name: str) -> None:
    """`flows.choices` (light: the parser and the settings models read it) spells each list once; it must be the
    owner's."""
    from typing import get_args

    import addclass.cli.args as cli_args
    import addclass.flows.choices as choices

    mine = get_args(getattr(choices, name)) if hasattr(choices, name) else getattr(cli_args, name)
    assert set(mine) == set(_owner_choices()[name])


def test_train_defaults_fit_the_device(tmp_path: Path, synthetic_store: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import addclass.cli.main as cli

    seen = {}

    def fake_train(config, *, launch, resume, progress):  # type: ignore[no-untyped-def]
        seen["config"], seen["launch"] = config, launch
        return tmp_path / "final"

    monkeypatch.setattr("addclass.tasks.training.train_launch.run_training", fake_train)
    assert cli.main(["train", str(synthetic_store), "--variant", "tiny", "--device", "cpu", "--out",
                     str(tmp_path / "run"), "--quiet"]) == 0
    c = seen["config"]
    from addclass.flows.settings import RUN_SIZES

    cpu = RUN_SIZES["cpu"]
    assert (c.iters, c.batch_size, c.crop_size, c.num_points) == (cpu.iters, cpu.batch_size, (cpu.crop_size,) * 2,
                                                                   cpu.num_points)
    assert "cpu defaults: iters 2000, batch_size 2, crop_size 256, num_points 8192" in capsys.readouterr().out
    assert c.checkpoint_every == 1000  # flows.settings.TRAIN_COMMAND_DEFAULTS
    assert c.ema_decay is None  # the recipe's
    assert cli.main(["train", str(synthetic_store), "--variant", "tiny", "--device", "cpu", "--iters", "5",
                     "--batch-size", "4", "--ema-decay", "0", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (seen["config"].iters, seen["config"].batch_size, seen["config"].ema_decay) == (5, 4, 0.0)  # flags win
    assert seen["launch"].nproc == 1 and seen["config"].accumulate == 1  # one process unless asked
    assert cli.main(["train", str(synthetic_store), "--variant", "tiny", "--device", "cpu", "--batch-size", "8",
                     "--nproc", "2", "--accumulate", "2", "--nnodes", "2", "--rdzv-endpoint", "n0:29400",
                     "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert seen["launch"] == Launch(nproc=2, nnodes=2, rdzv_endpoint="n0:29400") and seen["config"].accumulate == 2



def test_every_sub_command_has_a_handler() -> None:
    import argparse

    from addclass.cli.args import build_parser
    from addclass.cli.main import HANDLERS

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == set(HANDLERS)


def test_torch_threads_wait_passively_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passive OpenMP waiting when other processes keep at least half the cores busy, OpenMP's default on an
    idle machine, and the user's own choice always; the decision is a line that says which and why."""
    import os

    from addclass.cli.main import passive_threads

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    line = passive_threads(busy=0.9, cpus=2)
    assert line.startswith("threads: active") and "0.9 of 2 cores" in line and "OMP_WAIT_POLICY" not in os.environ
    assert passive_threads(busy=1.0, cpus=2).startswith("threads: passive")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "as set in the environment" in passive_threads(busy=9.0, cpus=2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert "as set in the environment" in passive_threads(busy=9.0, cpus=2) and "OMP_WAIT_POLICY" not in os.environ


def test_busy_cores_sees_a_process_that_spins_now() -> None:
    """`busy_cores` measures the cores other processes use now (not a 1-minute average): a process spinning
    beside it counts as most of a core."""
    import os
    import subprocess
    import sys

    from addclass.cli.main import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(window=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.6 <= busy <= (os.cpu_count() or 1) + 0.01


def test_the_console_script_sets_the_policy_before_torch_loads() -> None:
    """Under load, `addclass` sets the policy before torch is imported (OpenMP reads it once, at load)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ADDCLASS_THREADS")}
    code = ("import os, sys; from addclass.cli import main as cli; cli.busy_cores = lambda: 64.0; "
            "sys.argv = ['addclass', 'model-info', 'tiny', '--num-classes', '7', '--json']; "
            "assert 'torch' not in sys.modules; rc = cli.console_main(); "
            "print(os.environ.get('ADDCLASS_THREADS').split()[1], os.environ.get('OMP_WAIT_POLICY'), rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out[-3:] == ["passive", "PASSIVE", "0"]
