from __future__ import annotations

import math
from pathlib import Path

import pytest

from addclass.storage.store import open_label_store
from addclass.tasks.data.inspect import format_summary, summarize_store
from addclass.tasks.evaluation.evaluation_results import ModelEvaluation
from addclass.tasks.model_files.model_registry import (
    list_models,
    register_model,
    resolve_init_model,
    score_terms,
    selection_score,
)
from tests.evaluations import class_result, model_evaluation


def _results(miou: float, car_iou: float | None, split: str = "val", **more: float) -> ModelEvaluation:
    new = [class_result(n, iou) for n, iou in {"car": car_iou, **more}.items() if iou is not None]
    return model_evaluation({split: (miou, new)})


def test_selection_score_is_the_mean_of_precise_miou_and_new_class_ious() -> None:
    assert selection_score(_results(0.8, 0.6)) == pytest.approx(0.7)
    assert selection_score(_results(0.8, None)) == pytest.approx(0.8)
    assert math.isnan(selection_score(_results(0.8, 0.6, split="test")))  # val not evaluated


def test_the_registry_stores_the_evaluation_as_json_and_reads_it_back(fresh_store: Path) -> None:
    evaluation = _results(0.5, 0.25, bus=0.75)
    register_model(fresh_store, model_id="m1", path="/r/m1", label_version="v1", config={}, metrics=evaluation)
    stored = list_models(fresh_store)["models"]["m1"]["metrics"]
    assert stored == evaluation.to_dict() and ModelEvaluation.from_dict(stored) == evaluation
    assert score_terms(stored) == score_terms(evaluation) == {"precise": 0.5, "car": 0.25, "bus": 0.75}


def test_champion_challenger(fresh_store: Path) -> None:
    first = register_model(fresh_store, model_id="m1", path="/r/m1", label_version="v1", config={"iters": 1},
                           metrics=_results(0.5, 0.5))
    assert first["promoted"] and first["champion"] == "m1" and first["previous_champion"] is None
    worse = register_model(fresh_store, model_id="m2", path="/r/m2", label_version="v1", config={"iters": 2},
                           metrics=_results(0.4, 0.5))
    assert not worse["promoted"] and worse["champion"] == "m1" and worse["previous_score"] == pytest.approx(0.5)
    better = register_model(fresh_store, model_id="m3", path="/r/m3", label_version="v1", config={"iters": 3},
                            metrics=_results(0.6, 0.7))
    assert better["promoted"] and better["champion"] == "m3"
    unscored = register_model(fresh_store, model_id="m4", path="/r/m4", label_version="v1", config={},
                              metrics=_results(0.9, 0.9, split="test"))
    assert not unscored["promoted"]
    forced = register_model(fresh_store, model_id="m5", path="/r/m5", label_version="v1", config={},
                            metrics=_results(0.1, 0.1), promote="always")
    assert forced["champion"] == "m5"
    reg = list_models(fresh_store)
    assert reg["champion"] == "m5" and set(reg["models"]) == {"m1", "m2", "m3", "m4", "m5"}
    assert reg["models"]["m2"]["config_hash"] != reg["models"]["m3"]["config_hash"]
    assert open_label_store(fresh_store).section("models") == reg  # lives in the store document
    shown = summarize_store(fresh_store)["models"]  # what `addclass inspect` shows of it
    assert shown["champion"] == "m5" and shown["models"]["m3"]["score"] == pytest.approx(0.65)
    text = format_summary(summarize_store(fresh_store))
    assert "model   m5 (champion): v1, val score 0.1000, /r/m5" in text and "model   m4: v1, unscored" in text


def test_a_challenger_that_knows_more_classes_is_compared_on_the_shared_ones(fresh_store: Path) -> None:
    register_model(fresh_store, model_id="v2-model", path="/r/a", label_version="v2", config={},
                   metrics=_results(0.5, 0.9))  # score 0.70
    easy = _results(0.4, 0.9, bus=0.9)  # score 0.73, thanks to a class v2 lacks
    out = register_model(fresh_store, model_id="v3-easy", path="/r/b", label_version="v3", config={},
                         metrics=easy)
    assert out["score"] == pytest.approx(2.2 / 3) and out["compared_on"] == ["car", "precise"]
    assert not out["promoted"]  # worse on what both know (0.65 vs 0.70): bus does not count for it
    hard = _results(0.6, 0.9, bus=0.1)  # score 0.53
    out = register_model(fresh_store, model_id="v3-hard", path="/r/c", label_version="v3", config={}, metrics=hard)
    assert out["promoted"]  # better on what both know (0.75 vs 0.70): bus is not held against it


def test_bad_promote_mode(fresh_store: Path) -> None:
    with pytest.raises(ValueError, match="promote"):
        register_model(fresh_store, model_id="x", path="p", label_version="v1", config={},
                       metrics=model_evaluation({}), promote="sometimes")


def test_resolve_init_model(fresh_store: Path, tmp_path: Path) -> None:
    assert resolve_init_model(fresh_store, None) is None
    with pytest.raises(KeyError, match=f"{fresh_store} has no champion"):
        resolve_init_model(fresh_store, "champion")
    model = tmp_path / "run" / "final"
    with pytest.raises(FileNotFoundError, match=f"init_model {model} is not a trained model folder"):
        resolve_init_model(fresh_store, str(model))
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert resolve_init_model(fresh_store, str(model)) == str(model)
    register_model(fresh_store, model_id="m1", path=str(model), label_version="v1", config={},
                   metrics=_results(0.5, 0.5))
    assert resolve_init_model(fresh_store, "champion") == str(model)
