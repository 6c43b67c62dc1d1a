"""The add-class flow validates its parameters before any work (called via `.fn`, no Prefect API needed)."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest

from addclass.flows.add_class import add_class
from addclass.flows.params import LabelingParams
from addclass.storage.store import open_label_store
from tests.flows.prefect_server import free_port


def _untouched(store: Path) -> None:
    st = open_label_store(store)
    assert list(st.versions()) == ["v1"] and st.section("pseudo") == {} and not (store / "pseudo").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": ""}, ValueError, "non-empty"),
        ({"prompt": "sky"}, ValueError, "already exists"),
        ({"prompt": "car", "training": {"batch_size": 1}}, ValueError,
         "training.batch_size: Input should be greater than or equal to 2"),
        ({"prompt": "car", "labeling": {"kind": "grounded-sam", "sam_checkpoint": "/nowhere/sam.pth"}},
         FileNotFoundError, "/nowhere/sam.pth.*segment-anything"),
        ({"prompt": "car", "scale_out": "dask"}, ValueError, "needs a Prefect server"),
        ({"prompt": "car", "init_model": "champion"}, KeyError, "no champion model yet"),
        ({"prompt": "car", "init_model": "/nowhere/final"}, FileNotFoundError, "/nowhere/final is not a trained"),
        ({"prompt": "car", "eval_splits": ["valid"]}, ValueError, "eval_splits: .*'valid'"),
        ({"prompt": "car", "labeling": {"kind": "simulated", "splits": ["train", "valid"]}}, ValueError,
         "labeling.splits: .*'valid'"),
        ({"prompt": "car", "labeling": {"kind": "simulated", "splits": "train"}}, ValueError,
         "labeling.splits: Input should be a valid list"),
        ({"prompt": "car", "training": {"num_points": 0}}, ValueError, "num_points >= 1"),
        ({"prompt": "car", "training": {"num_workers": -1}}, ValueError, "num_workers"),
        ({"prompt": "car", "training": {"checkpoint_every": 0}}, ValueError, "checkpoint_every >= 1"),
        ({"prompt": "car", "training": {"iters": 600, "itres": 3}}, ValueError, "training.itres: Extra inputs"),
    ],
)
def test_bad_parameters_fail_before_any_work(fresh_store: Path, monkeypatch: pytest.MonkeyPatch,
                                             kwargs: dict, error: type[Exception], message: str) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    args = {"store": str(fresh_store), "labeling": {"kind": "simulated"}, **kwargs}
    with pytest.raises(error, match=message):
        add_class.fn(**args)  # `.fn`: the parameter objects as JSON objects, as a deployment run gets them
    _untouched(fresh_store)


def test_an_external_dask_scheduler_is_checked_before_any_work(fresh_store: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConnectionError, match=f"No Dask scheduler answers at dask_address='{address}'"):
            add_class.fn(prompt="car", store=str(fresh_store), labeling=LabelingParams(kind="simulated"),
                         dask_address=address)
    _untouched(fresh_store)
