"""Each setting is defined once: its settings model (`flows.settings`) is the flow parameter and the source of
its flags (`cli.fields`), and its default value is written once in the packages."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from addclass.cli.args import build_parser
from addclass.cli.fields import add_model_flags, flag_name, model_values
from addclass.flows.settings import (
    RUN_SIZES,
    SIZED_FIELDS,
    TRAIN_COMMAND_DEFAULTS,
    LabelingParams,
    PredictionParams,
    ReviewParams,
    TrainingParams,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cli", "flows", "tasks", "models", "storage", "common")
ALL = None

# sub-command -> (the group, its model, the fields it exposes (ALL: every one), the minimal argv)
EXPOSED: dict[str, list[tuple[str, type[BaseModel], tuple[str, ...] | None]]] = {
    "add-class": [("labeling", LabelingParams, ALL), ("training", TrainingParams, ALL),
                  ("review", ReviewParams, ALL)],
    "retrain": [("training", TrainingParams, ALL)],
    "train": [("training", TrainingParams, ALL)],
    "pseudo-label": [("labeling", LabelingParams, tuple(f for f in LabelingParams.model_fields
                                                        if f not in ("splits", "gpus"))),
                     ("training", TrainingParams, ("device", "seed"))],
    "predict": [("prediction", PredictionParams, ALL)],
    "review export": [("review", ReviewParams, ("top", "by", "model", "format"))],
}
MINIMAL = {"add-class": ["--prompt", "car", "--store", "s"], "retrain": ["--store", "s"],
           "train": ["s", "--out", "o"], "pseudo-label": ["s", "--prompt", "car"], "predict": ["m"],
           "review export": ["s", "o", "--class", "car"]}
FLOW_COMMANDS = ("add-class", "retrain")
COMMAND_DEFAULTS = {"train": TRAIN_COMMAND_DEFAULTS}  # the documented differences (flows.settings' table)


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _literal(annotation: Any) -> tuple[Any, ...] | None:
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) is Literal:
            return get_args(candidate)
    return None


CASES = [(command, group, model, fields) for command, groups in EXPOSED.items() for group, model, fields in groups]


@pytest.mark.parametrize(("command", "group", "model", "fields"), CASES,
                         ids=[f"{c}-{g}" for c, g, _, _ in CASES])
def test_every_field_has_exactly_one_generated_flag_with_its_default_and_choices(
        command: str, group: str, model: type[BaseModel], fields: tuple[str, ...] | None) -> None:
    parser = _subparser(command)
    names = tuple(model.model_fields) if fields is None else fields
    for name in names:
        info = model.model_fields[name]
        actions = [a for a in parser._actions if a.dest == f"{group}.{name}"]
        assert len(actions) == 1, (command, name)
        action = actions[0]
        flag = flag_name(name, info, flow=command in FLOW_COMMANDS, prefix="review-" if (
            command in FLOW_COMMANDS and group == "review") else "")
        assert flag in action.option_strings, (command, name, action.option_strings)  # generated
        choices = _literal(info.annotation)
        assert (tuple(action.choices) if action.choices is not None else None) == choices, (command, name)
    # no other flag sets a field of the group, and none sets a field the command does not expose
    assert {a.dest for a in parser._actions if a.dest.startswith(group + ".")} == {f"{group}.{n}" for n in names}
    # with no flag given, the model's defaults apply, but for the command's documented own defaults
    values = model_values(parser.parse_args(MINIMAL[command]), group)
    own = {k: v for k, v in COMMAND_DEFAULTS.get(command, {}).items() if k in names}
    assert values == {k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}
    built = model(**values)
    for name in names:
        expected = own.get(name, model.model_fields[name].get_default(call_default_factory=True))
        assert getattr(built, name) == expected, (command, name)


def test_flags_set_their_fields_and_bools_go_both_ways() -> None:
    p = _subparser("add-class")
    a = p.parse_args(["--prompt", "c", "--store", "s", "--no-inverse-near-pseudo", "--refine", "--points", "9",
                      "--pseudo-batch-size", "3", "--train-batch-size", "4", "--scale-range", "1", "2",
                      "--test-ratios", "1", "1.5", "--negative-phrases", "toy car", "x"])
    assert model_values(a, "training") == {"inverse_weight_near_pseudo": False, "num_points": 9, "batch_size": 4,
                                           "scale_range": [1.0, 2.0], "test_ratios": [1.0, 1.5]}
    assert model_values(a, "labeling") == {"refine": True, "batch_size": 3, "negative_phrases": ["toy car", "x"]}
    assert model_values(p.parse_args(["--prompt", "c", "--store", "s", "--inverse-near-pseudo"]), "training") == {
        "inverse_weight_near_pseudo": True}
    predict = _subparser("predict").parse_args(["m", "--no-bf16", "--tta-scales", "1", "2"])
    assert PredictionParams(**model_values(predict, "prediction")) == PredictionParams(bf16=False,
                                                                                      tta_scales=[1.0, 2.0])


def test_a_field_of_an_unknown_type_is_refused() -> None:
    class Odd(BaseModel):
        mapping: dict[str, int] = {}

    with pytest.raises(TypeError, match="No command-line flag"):
        add_model_flags(argparse.ArgumentParser(), Odd, group="odd")
    with pytest.raises(ValueError, match="no fields"):
        add_model_flags(argparse.ArgumentParser(), TrainingParams, group="t", only=("iter",))


def test_the_entry_points_defaults_differ_only_where_the_table_says() -> None:
    """`addclass train`'s own defaults and its device-sized ones are the rows of flows.settings' table."""
    import addclass.flows.settings as settings_module

    table = settings_module.__doc__ or ""
    for name in (*TRAIN_COMMAND_DEFAULTS, *SIZED_FIELDS):
        assert f"``{name}``" in table, name
    for name, value in TRAIN_COMMAND_DEFAULTS.items():
        assert TrainingParams.model_fields[name].default != value, name  # a row that differs
    cpu = RUN_SIZES["cpu"]
    flows_defaults = TrainingParams()
    assert (flows_defaults.batch_size, flows_defaults.crop_size, flows_defaults.num_points) == (
        cpu.batch_size, cpu.crop_size, cpu.num_points)  # CPU-sized; iters is the table's quick run


def test_the_task_configs_have_the_settings_defaults() -> None:
    """The tasks' dataclasses and the settings models agree on every shared default."""
    from addclass.flows.params import labeler_config, predict_config
    from addclass.tasks.labels.pseudo_label import LabelerConfig
    from addclass.tasks.prediction.predict import PredictConfig

    assert predict_config(PredictionParams()) == PredictConfig()
    assert labeler_config(LabelingParams(), device=LabelerConfig.device, seed=LabelerConfig.seed) == LabelerConfig()


def _code_constants(path: Path) -> list[tuple[Any, int]]:
    """The literal constants of a module's code (docstrings and comments are not code)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and id(node) not in docstrings]


def _package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


# value -> the one module that writes it (a second writer fails)
ONCE = {12544: "models/release.py", 80000: "models/release.py", 8192: "models/release.py"}


def test_each_default_value_is_written_once_in_the_packages() -> None:
    found: dict[Any, list[str]] = {value: [] for value in ONCE}
    for path in _package_files():
        rel = path.relative_to(ROOT).as_posix()
        for value, line in _code_constants(path):
            if type(value) is int and value in ONCE:
                found[value].append(f"{rel}:{line}")
    for value, where in ONCE.items():
        assert [w.split(":")[0] for w in found[value]] == [where], (value, found[value])


LABELER_OPTIONS = ("sam_variant", "dino_config", "box_threshold", "text_threshold", "nms_iou", "max_boxes",
                   "dino_image_size", "tile_overlap", "negative_iou", "refine_margin")


def test_no_labeler_option_has_a_literal_default_outside_its_constant() -> None:
    """Parameters and fields named after a labeler option take its default from `models.labelers.options`:
    none spells the value again (the point counts: `test_each_default_value_is_written_once_in_the_packages`)."""
    literal = []
    for path in _package_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            pairs: list[tuple[str, ast.expr | None]] = []
            if isinstance(node, ast.arguments):
                positional = node.posonlyargs + node.args
                pairs += list(zip([a.arg for a in positional[len(positional) - len(node.defaults):]],
                                  node.defaults, strict=True))
                pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                pairs.append((node.target.id, node.value))
            for name, default in pairs:
                if name in LABELER_OPTIONS and isinstance(default, ast.Constant) and default.value is not None:
                    literal.append(f"{path.relative_to(ROOT)}:{default.lineno} {name}={default.value!r}")
    assert literal == []


def test_the_parser_loads_no_torch() -> None:
    """The settings models are light: building every flag of every sub-command imports no torch."""
    code = ("import sys; from addclass.cli.args import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
