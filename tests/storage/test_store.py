from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from addclass.storage.lock import StoreLockedError, store_lock
from addclass.storage.names import class_name_from_prompt, parse_image_id, parse_version
from addclass.storage.registry import ClassInfo
from addclass.storage.store import (
    ATTRS_KEY,
    SCHEMA_VERSION,
    ImmutableError,
    StoreSchemaError,
    build_label_store,
    labels_sha256,
    open_label_store,
)


def test_round_trip_metadata(synthetic_store: Path) -> None:
    st = open_label_store(synthetic_store)
    assert st.info["schema_version"] == SCHEMA_VERSION
    assert [c.name for c in st.classes()] == ["others", "human", "building", "vegetation", "ground", "sky", "water"]
    assert all(c.source == "precise" for c in st.classes())
    assert list(st.versions()) == ["v1"] and st.versions()["v1"].parent is None
    assert st.resolve_version("latest") == "v1"
    n = sum(len(st.image_ids(s)) for s in st.splits())
    assert n == 8 and st.splits() == ["train", "val", "test"]
    image_id = st.image_ids("train")[0]
    rec = st.image_record("train", image_id)
    assert st.read_image("train", image_id).shape == (rec.height, rec.width, 3)
    labels = st.read_labels("train", image_id)
    assert labels.dtype == np.uint8 and labels.shape == (96, 128)
    assert st.stored_sha256("train", image_id, version="v1") == labels_sha256(labels)
    assert st.verify_version("v1") == []


def test_chunks_are_bounded_and_compressed(tmp_path: Path) -> None:
    with build_label_store(tmp_path / "big.zarr", name="t", source="test") as st:
        st.write_precise_labels("train", "a", np.zeros((1500, 2100), np.uint8))
        from addclass.storage.registry import ImageRecord

        st.write_image_records("train", [ImageRecord(id="a", path="x.png", sha256="0", height=1500, width=2100)])
    arr = zarr.open_array(str(tmp_path / "big.zarr" / "labels/v1/train/a"), mode="r")
    assert max(arr.chunks) <= 1024
    assert arr.compressors and "zstd" in type(arr.compressors[0]).__name__.lower()


def test_precise_labels_cannot_be_written_after_ingest(fresh_store: Path) -> None:
    st = open_label_store(fresh_store, mode="a")
    image_id = st.image_ids("train")[0]
    before = st.read_labels("train", image_id).copy()
    with pytest.raises(ImmutableError):
        st.write_precise_labels("train", image_id, np.zeros_like(before))
    with pytest.raises(ImmutableError):
        st.write_version_labels("v1", "train", image_id, np.zeros_like(before), np.zeros_like(before))
    with pytest.raises(ImmutableError):
        st.begin_version("v1", parent="v1", class_ids=[0], policy="x", spec={})
    assert np.array_equal(open_label_store(fresh_store).read_labels("train", image_id), before)


def test_read_only_store_refuses_writes(synthetic_store: Path) -> None:
    st = open_label_store(synthetic_store)
    with pytest.raises(PermissionError):
        st.set_section("x", {})


def test_draft_version_publish_is_all_or_nothing(fresh_store: Path) -> None:
    st = open_label_store(fresh_store, mode="a")
    st.begin_version("v2", parent="v1", class_ids=list(range(8)), policy="carve-others", spec={"a": 1})
    ids = [(s, i) for s in st.splits() for i in st.image_ids(s)]
    for s, i in ids[:-1]:
        lab = st.read_labels(s, i)
        st.write_version_labels("v2", s, i, lab, np.zeros_like(lab))
    with pytest.raises(RuntimeError, match="unwritten"):
        st.publish_version("v2")
    assert "v2" not in open_label_store(fresh_store).versions()
    s, i = ids[-1]
    lab = st.read_labels(s, i)
    st.write_version_labels("v2", s, i, lab, np.ones_like(lab))
    info = st.publish_version("v2", new_classes=[ClassInfo(id=7, name="car", source="pseudo", prompt="car")])
    assert info.parent == "v1" and info.class_ids == tuple(range(8))
    ro = open_label_store(fresh_store)
    assert ro.resolve_version("latest") == "v2" and ro.class_by_name("car").source == "pseudo"
    assert np.array_equal(ro.read_provenance(s, i, version="v2"), np.ones_like(lab))
    for version in ("v1", "v2"):  # one call, the same arrays as the two separate reads
        both = ro.read_labels_and_provenance(s, i, version=version)
        assert np.array_equal(both[0], ro.read_labels(s, i, version=version))
        assert np.array_equal(both[1], ro.read_provenance(s, i, version=version))
    with pytest.raises(ImmutableError):
        st.write_version_labels("v2", s, i, lab, lab)


def test_a_handle_opened_before_another_writer_published_does_not_undo_it(fresh_store: Path) -> None:
    stale = open_label_store(fresh_store, mode="a")  # e.g. a command validating its input before the lock
    writer = open_label_store(fresh_store, mode="a")
    with writer.lock(purpose="merge"):
        writer.begin_version("v2", parent="v1", class_ids=list(range(8)), policy="carve-others", spec={})
        for s in writer.splits():
            for i in writer.image_ids(s):
                lab = writer.read_labels(s, i)
                writer.write_version_labels("v2", s, i, lab, np.zeros_like(lab))
        writer.publish_version("v2", new_classes=[ClassInfo(id=7, name="car", source="pseudo", prompt="car")])
    with stale.lock(purpose="import-pseudo"):  # taking the lock re-reads the document
        stale.set_section("pseudo", {"bus": {"splits": {}}})
    ro = open_label_store(fresh_store)
    assert list(ro.versions()) == ["v1", "v2"] and ro.class_by_name("car").id == 7
    assert ro.section("pseudo") == {"bus": {"splits": {}}}


def test_draft_with_other_settings_is_refused(fresh_store: Path) -> None:
    st = open_label_store(fresh_store, mode="a")
    st.begin_version("v2", parent="v1", class_ids=[0, 1], policy="carve-others", spec={"a": 1})
    st.begin_version("v2", parent="v1", class_ids=[0, 1], policy="carve-others", spec={"a": 1})  # resume: same
    with pytest.raises(ValueError, match="other settings"):
        st.begin_version("v2", parent="v1", class_ids=[0, 1], policy="overwrite", spec={"a": 1})


def test_verify_detects_tampering(fresh_store: Path) -> None:
    st = open_label_store(fresh_store)
    image_id = st.image_ids("test")[0]
    arr = zarr.open_array(str(fresh_store / "labels/v1/test" / image_id), mode="r+")
    arr[0, 0] = (int(arr[0, 0]) + 1) % 7
    assert st.verify_version("v1") == [f"test/{image_id}"]


def test_newer_schema_is_a_clear_error(fresh_store: Path) -> None:
    g = zarr.open_group(str(fresh_store), mode="a")
    doc = dict(g.attrs[ATTRS_KEY])
    doc["schema_version"] = SCHEMA_VERSION + 1
    g.attrs[ATTRS_KEY] = doc
    with pytest.raises(StoreSchemaError, match="newer"):
        open_label_store(fresh_store)


def test_plain_zarr_group_is_not_a_store(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(StoreSchemaError, match="not an addclass"):
        open_label_store(tmp_path / "g.zarr")
    with pytest.raises(FileNotFoundError, match="No label store"):
        open_label_store(tmp_path / "missing.zarr")


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with build_label_store(tmp_path / "s.zarr", name="t", source="test") as st:
            st.write_precise_labels("train", "a", np.zeros((8, 8), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_empty_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty store"):
        with build_label_store(tmp_path / "s.zarr", name="t", source="test"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_lock_excludes_second_writer_and_survives_kill(fresh_store: Path) -> None:
    holder = (
        "import sys, time\n"
        "from addclass.storage.lock import store_lock\n"
        "with store_lock(sys.argv[1], purpose='test holder'):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(fresh_store)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}.*test holder"):
            with store_lock(fresh_store):
                pass
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError):
            with store_lock(fresh_store, wait=True, timeout=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5
        proc.send_signal(signal.SIGKILL)  # a crashed writer must not leave a stale lock
        proc.wait(10)
        with store_lock(fresh_store, wait=True, timeout=10):
            info = json.loads((fresh_store / ".addclass.lock").read_text())
            assert info["pid"] == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_overwrite_refuses_locked_store(fresh_store: Path) -> None:
    from addclass.tasks.data.ingest import ingest_synthetic

    with store_lock(fresh_store):
        # flock is per open file description, so even this process cannot take it twice
        with pytest.raises(StoreLockedError):
            ingest_synthetic(fresh_store, images=3, size=(40, 40), overwrite=True, progress=False)
    assert open_label_store(fresh_store).splits()  # the old store is intact
    assert not [p for p in fresh_store.parent.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]


@pytest.mark.parametrize(
    ("prompt", "name"), [("car", "car"), ("Traffic light", "traffic_light"), ("../x", "x"), ("3d box", "c_3d_box")]
)
def test_prompt_to_class_name_is_safe(prompt: str, name: str) -> None:
    assert class_name_from_prompt(prompt) == name


@pytest.mark.parametrize("prompt", ["", "   ", "../", "///"])
def test_prompt_without_letters_is_refused(prompt: str) -> None:
    with pytest.raises(ValueError, match="prompt|class name"):
        class_name_from_prompt(prompt)


@pytest.mark.parametrize("bad", ["../a", "a/b", "", ".hidden", "a" * 200])
def test_bad_image_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)[:20].strip("'") or "image id"):
        parse_image_id(bad)


def test_version_names() -> None:
    assert parse_version("v12") == "v12"
    for bad in ("v0", "2", "v1/..", "latest"):
        with pytest.raises(ValueError):
            parse_version(bad)


@pytest.mark.parametrize("damage", ['"zarr_format": 7', "control", "cut"])
def test_damaged_store_metadata_is_an_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    from addclass.storage.store import StoreSchemaError
    from addclass.tasks.data.ingest import ingest_synthetic

    path = ingest_synthetic(tmp_path / "s.zarr", images=3, size=(40, 40), progress=False)
    meta = path / "zarr.json"
    text = meta.read_text()
    if damage == "control":
        text = text[:9] + "\x01" + text[10:]
    elif damage == "cut":
        text = text[: len(text) // 2]
    else:
        text = text.replace('"zarr_format": 3', damage)
    meta.write_text(text)
    with pytest.raises(StoreSchemaError, match=rf"{meta} is not valid zarr group metadata"):
        open_label_store(path)


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_a_missing_or_damaged_label_chunk_is_an_error_naming_image_and_version(tmp_path: Path, damage: str) -> None:
    """zarr reads a deleted chunk as its fill value (0, "others"): a read must not hand that out as labels."""
    from addclass.storage.store import StoreCorruptError
    from addclass.tasks.data.ingest import ingest_synthetic

    path = ingest_synthetic(tmp_path / "s.zarr", images=3, size=(40, 40), progress=False)
    st = open_label_store(path)
    image_id = st.image_ids("train")[0]
    good = st.read_labels("train", image_id)
    chunk = path / "labels" / "v1" / "train" / image_id / "c" / "0" / "0"
    if damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(b"\x00" * 7 + chunk.read_bytes()[7:])
    with pytest.raises(StoreCorruptError, match=rf"image '{image_id}' \(train, version v1\)"):
        st.read_labels("train", image_id)
    assert st.verify_version("v1") == [f"train/{image_id}"]
    other = st.image_ids("val")[0]
    assert st.read_labels("val", other).shape == good.shape  # the other images still read


def test_an_image_changed_after_ingest_is_refused_on_every_read(tmp_path: Path) -> None:
    """Labels, pseudo labels and cached embeddings belong to the ingested file: training, evaluation and every
    labeler read images through read_image, which checks the recorded sha256."""
    import cv2

    from addclass.tasks.data.ingest import ingest_synthetic

    path = ingest_synthetic(tmp_path / "s.zarr", images=3, size=(40, 40), progress=False)
    st = open_label_store(path)
    image_id = st.image_ids("train")[0]
    before = st.read_image("train", image_id)
    file = st.image_path(st.image_record("train", image_id))
    assert cv2.imwrite(str(file), 255 - cv2.imread(str(file)))  # same size, other pixels
    with pytest.raises(ValueError, match=rf"id '{image_id}'.*changed since ingest"):
        st.read_image("train", image_id)
    assert not np.array_equal(st.read_image("train", image_id, verify=False), before)  # an explicit opt-out


def test_schema_names_stay_importable_from_storage_store() -> None:
    """The schema module holds these; callers keep importing them from storage.store."""
    import addclass.storage.schema as schema_module
    import addclass.storage.store as store_module

    for name in ("ATTRS_KEY", "SCHEMA_VERSION", "StoreSchemaError", "StoreCorruptError", "ImmutableError",
                 "is_label_store", "labels_sha256", "now_iso"):
        assert getattr(store_module, name) is getattr(schema_module, name)
    assert set(store_module.__all__) <= set(dir(store_module))
