"""The add-class flow validates its parameters before any work (called via `.fn`, no Prefect API needed)."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest

from flows.add_class import add_class
from storage.store import open_label_store
from tests.flows.prefect_server import free_port


def _untouched(store: Path) -> None:
    st = open_label_store(store)
    assert list(st.versions()) == ["v1"] and st.section("pseudo") == {} and not (store / "pseudo").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": ""}, ValueError, "non-empty"),
        ({"prompt": "sky"}, ValueError, "already exists"),
        ({"prompt": "car", "batch_size": 1}, ValueError, "batch_size >= 2"),
        ({"prompt": "car", "labeler": "grounded-sam", "sam_checkpoint": "/nowhere/sam.pth"}, FileNotFoundError,
         "/nowhere/sam.pth.*segment-anything"),
        ({"prompt": "car", "scale_out": "dask"}, ValueError, "needs a Prefect server"),
        ({"prompt": "car", "init_model": "champion"}, KeyError, "no champion model yet"),
        ({"prompt": "car", "init_model": "/nowhere/final"}, FileNotFoundError, "/nowhere/final is not a trained"),
        ({"prompt": "car", "eval_splits": ["valid"]}, ValueError, "eval_splits: .*'valid'"),
        ({"prompt": "car", "pseudo_splits": "train"}, ValueError, "pseudo_splits to be a non-empty list"),
        ({"prompt": "car", "num_points": 0}, ValueError, "num_points >= 1"),
        ({"prompt": "car", "num_workers": -1}, ValueError, "num_workers"),
    ],
)
def test_bad_parameters_fail_before_any_work(fresh_store: Path, monkeypatch: pytest.MonkeyPatch,
                                             kwargs: dict, error: type[Exception], message: str) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    args = {"store": str(fresh_store), "labeler": "simulated", **kwargs}
    with pytest.raises(error, match=message):
        add_class.fn(**args)
    _untouched(fresh_store)


def test_an_external_dask_scheduler_is_checked_before_any_work(fresh_store: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConnectionError, match=f"No Dask scheduler answers at dask_address='{address}'"):
            add_class.fn(prompt="car", store=str(fresh_store), labeler="simulated", dask_address=address)
    _untouched(fresh_store)
