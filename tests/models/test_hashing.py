"""models/hashing.py and the persisted hashes made with it, pinned to values of the code before the move.

These values live in users' stores and run folders (image sha256s, model manifests, pseudo-label settings
keys, registry config hashes, run-folder names): a failure here means existing stores would be relabelled or
fail their checks, or existing runs would not resume. Change a pin only with a migration, never to make it
pass.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from addclass.models.hashing import bytes_sha256, file_sha256, json_hash
from addclass.tasks.labels.pseudo_label import settings_key
from addclass.tasks.model_files.model_registry import config_hash
from addclass.tasks.training.train import TrainConfig, run_name

DATA = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB chunk
DATA_SHA256 = "7d471e4af16db5a30ce10aebbc29f5178b2edbad6c7dc2e8ff8ee6e4848a726f"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# Unsorted keys, nesting, a float, None, non-ASCII text (escaped) and a path (by its str).
OBJ = {"b": [1, 2.5, None], "a": {"z": True, "é": "ü"}, "path": PurePosixPath("/x/y")}
OBJ_SHA256 = "7fec092ce498a21121bcfac4676696d67d310f58722afb4ebaffac492ce3024b"
OBJ_SHA1_8 = "59c0858e"


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 1000])
def test_file_sha256_is_pinned(tmp_path: Path, chunk_bytes: int) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    assert file_sha256(path, chunk_bytes=chunk_bytes) == DATA_SHA256
    assert file_sha256(str(path)) == DATA_SHA256
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == EMPTY_SHA256


def test_bytes_sha256_is_the_file_sha256() -> None:
    assert bytes_sha256(DATA) == DATA_SHA256
    assert bytes_sha256(b"") == EMPTY_SHA256


def test_json_hash_is_pinned() -> None:
    assert json_hash(OBJ) == OBJ_SHA256
    assert json_hash(OBJ, length=16) == OBJ_SHA256[:16]
    assert json_hash(OBJ, algorithm="sha1", length=8) == OBJ_SHA1_8
    reordered = {"path": "/x/y", "a": {"é": "ü", "z": True}, "b": [1, 2.5, None]}
    assert json_hash(reordered) == OBJ_SHA256  # key order and str-for-path do not matter


def test_config_hash_and_settings_key_are_pinned() -> None:
    assert config_hash(OBJ) == "7fec092ce498a211"
    assert settings_key(OBJ) == "7fec092ce498a211"


def test_run_name_is_pinned() -> None:
    """Also fails when a `TrainConfig` field is added or a default changes: every run-folder name changes
    then, so earlier runs are no longer resumed by a rerun. A field added later (`LATER_FIELDS`) leaves the
    names of runs it does not change as they were (both recipes have no weight average by default); one that
    sets it gets another name."""
    cfg = TrainConfig(store="s.zarr", out_dir="runs/x", version="v2", variant="tiny", iters=3, seed=7,
                      reweight="inverse")
    assert run_name(cfg) == "v2-tiny-inverse-s7-i3-105c8bb1"
    assert run_name(replace(cfg, recipe="paper")) == "v2-tiny-inverse-s7-i3-928636e7"
    assert run_name(replace(cfg, recipe="paper", ema_decay=0.0)) == "v2-tiny-inverse-s7-i3-928636e7"
    assert run_name(replace(cfg, recipe="paper", ema_decay=0.99)) != run_name(replace(cfg, recipe="paper"))
    assert run_name(replace(cfg, ema_decay=0.0)) == run_name(cfg)
    assert run_name(replace(cfg, ema_decay=0.99)) == "v2-tiny-inverse-s7-i3-d2a9d51d"
