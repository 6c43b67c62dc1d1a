"""Offline BERT for GroundingDINO: vocab, tokenizer dir, Recipe A patches, the transformers-5 wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel

from addclass.models.hashing import file_sha256
from addclass.models.labelers.bert_offline import (
    OFFLINE_BERT_PREFIX,
    VOCAB_SHA256,
    OfflineBertWarper,
    bert_config_for,
    extended_attention_mask,
    install_offline_patches,
    load_tokenizer,
    packaged_vocab_path,
    patches_installed,
    tokenizer_dir,
)

CAPTIONS = ["car . person . traffic light .", "dog ."]
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(root=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def small_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=2)).eval()


def _gd_text_inputs(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize as GroundingDINO.forward does: 3-D sub-sentence mask and restarted position ids."""
    from groundingdino.models.GroundingDINO.bertwarper import (
        generate_masks_with_special_tokens_and_transfer_map,
    )

    tokenized = tokenizer(captions, padding="longest", return_tensors="pt")
    special = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])
    masks, position_ids, _ = generate_masks_with_special_tokens_and_transfer_map(
        tokenized, special, tokenizer
    )
    return {
        "input_ids": tokenized["input_ids"],
        "token_type_ids": tokenized["token_type_ids"],
        "attention_mask": masks,
        "position_ids": position_ids,
    }


def test_packaged_vocab_is_bert_base_uncased() -> None:
    path = packaged_vocab_path()
    assert file_sha256(path) == VOCAB_SHA256
    assert path.stat().st_size == 231_508


def test_tokenizer_ids_and_lower_casing(tokenizer) -> None:
    assert tokenizer("car . person . traffic light .")["input_ids"] == [
        101,
        2482,
        1012,
        2711,
        1012,
        4026,
        2422,
        1012,
        102,
    ]
    assert tokenizer("Car ?")["input_ids"] == [101, 2482, 1029, 102]
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]"]) == [0, 100, 101, 102]
    # No truncation at 128 (the packaged all-MiniLM tokenizer.json would truncate).
    assert len(tokenizer(" . ".join(["car"] * 100))["input_ids"]) == 201


def test_tokenizer_dir_is_created_once_and_verified(tmp_path: Path) -> None:
    first = tokenizer_dir(root=tmp_path)
    assert sorted(p.name for p in first.iterdir()) == ["tokenizer_config.json", "vocab.txt"]
    assert json.loads((first / "tokenizer_config.json").read_text())["do_lower_case"] is True
    mtime = (first / "vocab.txt").stat().st_mtime_ns
    assert tokenizer_dir(root=tmp_path) == first and (first / "vocab.txt").stat().st_mtime_ns == mtime
    with open(first / "vocab.txt", "a") as f:
        f.write("tampered\n")
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_dir(root=tmp_path)


def test_bert_config_for() -> None:
    base = bert_config_for("bert-base-uncased")
    assert (base.num_hidden_layers, base.hidden_size, base.vocab_size) == (12, 768, 30522)
    assert bert_config_for(f"{OFFLINE_BERT_PREFIX}2").num_hidden_layers == 2
    with pytest.raises(ValueError, match="offline"):
        bert_config_for("roberta-base")


def test_extended_attention_mask_values() -> None:
    two_d = torch.tensor([[1, 1, 0]])
    ext = extended_attention_mask(two_d, dtype=torch.float32)
    assert ext.shape == (1, 1, 1, 3)
    assert ext[0, 0, 0].tolist() == [0.0, 0.0, torch.finfo(torch.float32).min]
    three_d = torch.tensor([[[True, False], [False, True]]])
    ext = extended_attention_mask(three_d, dtype=torch.bfloat16)
    assert ext.shape == (1, 1, 2, 2) and ext.dtype == torch.bfloat16
    assert ext[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min and ext[0, 0, 1, 1] == 0


def test_wrapper_keeps_checkpoint_keys(small_bert: BertModel) -> None:
    wrapper = OfflineBertWarper(small_bert)
    keys = set(wrapper.state_dict())
    assert keys == set(small_bert.state_dict())  # exactly embeddings.*, encoder.*, pooler.*
    assert {k.split(".")[0] for k in keys} == {"embeddings", "encoder", "pooler"}
    assert [name for name, _ in wrapper.named_children()] == ["embeddings", "encoder", "pooler"]
    assert wrapper.config is small_bert.config


def test_wrapper_equals_bert_model_with_padding_mask(small_bert: BertModel, tokenizer) -> None:
    tokenized = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours = OfflineBertWarper(small_bert)(**tokenized, return_dict=True, head_mask=None)
        theirs = small_bert(**tokenized)
    valid = tokenized["attention_mask"].bool()
    torch.testing.assert_close(ours["last_hidden_state"][valid], theirs.last_hidden_state[valid])
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output)


def test_wrapper_honours_sub_sentence_mask(small_bert: BertModel, tokenizer) -> None:
    """With GroundingDINO's 3-D mask every sub-sentence is encoded as if alone (restarted positions)."""
    inputs = _gd_text_inputs(tokenizer, CAPTIONS[:1])
    wrapper = OfflineBertWarper(small_bert)
    with torch.no_grad():
        full = wrapper(**inputs)["last_hidden_state"][0]  # L x C
        blocks = inputs["attention_mask"][0]  # L x L
        assert not blocks.all()  # the mask really is block-diagonal
        start = 0
        while start < blocks.shape[0]:
            end = start + int(blocks[start, start:].sum())
            alone = wrapper(
                input_ids=inputs["input_ids"][:, start:end],
                position_ids=inputs["position_ids"][:, start:end],
                token_type_ids=inputs["token_type_ids"][:, start:end],
            )["last_hidden_state"][0]
            torch.testing.assert_close(full[start:end], alone, atol=1e-5, rtol=1e-5)
            start = end
    # and the block structure changes the result compared with full attention
    with torch.no_grad():
        dense = wrapper(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])[
            "last_hidden_state"
        ][0]
    assert (dense - full).abs().max() > 1e-3


@pytest.mark.skipif(
    TRANSFORMERS_MAJOR >= 5, reason="the shipped BertModelWarper only builds with transformers < 5"
)
def test_wrapper_equals_shipped_warper_on_transformers_4(small_bert: BertModel, tokenizer) -> None:
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper

    inputs = _gd_text_inputs(tokenizer, CAPTIONS)
    with torch.no_grad():
        ours = OfflineBertWarper(small_bert)(**inputs)
        shipped = BertModelWarper(small_bert)(**inputs)
    assert (ours["last_hidden_state"] - shipped["last_hidden_state"]).abs().max() == 0
    assert (ours["pooler_output"] - shipped["pooler_output"]).abs().max() == 0


def test_install_offline_patches_is_idempotent() -> None:
    from groundingdino.models.GroundingDINO import groundingdino as gd_module
    from groundingdino.util import get_tokenlizer

    install_offline_patches()
    functions = (get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model)
    install_offline_patches()
    assert patches_installed()
    assert gd_module.BertModelWarper is OfflineBertWarper
    assert (get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model) == functions
    model = get_tokenlizer.get_pretrained_language_model(f"{OFFLINE_BERT_PREFIX}1")
    assert isinstance(model, BertModel) and model.config.num_hidden_layers == 1
    assert get_tokenlizer.get_tokenlizer("bert-base-uncased")("car .")["input_ids"] == [101, 2482, 1012, 102]
