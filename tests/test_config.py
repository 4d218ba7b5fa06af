"""Config loading, overrides and validation."""

from __future__ import annotations

import pytest
from conftest import ROOT

from cmal.config import (
    Config,
    ConfigError,
    config_hash,
    load_config,
    save_config,
    to_dict,
)


def test_defaults_match_the_method():
    m = Config().model
    assert (m.text.layers, m.visual.layers, m.unified.layers) == (6, 3, 6)
    assert (m.unified.hidden, m.unified.heads) == (768, 12)
    assert m.prompt.p_swap == 0.5 and m.prompt.mode == "both"
    assert m.losses.amc and m.losses.mlm and m.losses.itm and not m.losses.itc


def test_file_then_overrides(tmp_path):
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["model.unified.layers=3", "seed=7"])
    assert cfg.model.unified.layers == 3 and cfg.seed == 7
    assert cfg.model.text.hidden == 64  # from the file
    assert cfg.model.visual.feature_dim == 2048  # default kept
    # YAML 1.1 reads "1e-4" as a string; a float field takes it as the number it is.
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(None, ["optim.lr=2E+1"]).optim.lr == 20.0


def test_base_include_and_precedence(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  unified: {layers: 5, hidden: 32, heads: 4}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  unified: {layers: 1}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.model.unified.layers == 1 and cfg.model.unified.hidden == 32


def test_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  unified:\n    layerz: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.unified\.layerz'"):
        load_config(f)


def test_wrong_type_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  prompt:\n    p_swap: lots\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.prompt\.p_swap: expected float"):
        load_config(f)
    f.write_text("model:\n  prompt:\n    mode: sideways\n")
    with pytest.raises(ConfigError, match=r"model\.prompt\.mode: expected one of 'both'"):
        load_config(f)
    f.write_text("model:\n  unified: 3\n")
    with pytest.raises(ConfigError, match=r"model\.unified: expected a mapping"):
        load_config(f)


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"command line \(model\.text\.layers=two\)"):
        load_config(None, ["model.text.layers=two"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, ["model.text.layers"])


def test_value_checks():
    with pytest.raises(ConfigError, match=r"model\.unified\.hidden: 100 is not divisible"):
        load_config(None, ["model.unified.hidden=100"])
    with pytest.raises(ConfigError, match=r"model\.prompt\.p_swap: must be in \[0, 1\]"):
        load_config(None, ["model.prompt.p_swap=1.5"])
    with pytest.raises(ConfigError, match="AMC needs the prompt layer"):
        load_config(None, ["model.prompt.enabled=false"])
    with pytest.raises(ConfigError, match=r"task\.head_only: not for rec"):
        load_config(None, ["task.name=rec", "task.head_only=true"])


def test_save_and_hash_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["model.prompt.mode=text"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(ROOT / "configs/model/tiny.yaml")) != config_hash(cfg)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_shipped_model_configs_load(name):
    load_config(ROOT / f"configs/model/{name}.yaml")


def test_hash_of_a_run_saved_before_new_fields_is_kept():
    """configs/pretrain/world.yaml hashed as commit 1302003 did, before engine.bf16_mode and
    data.bucket_pool existed: a field added since, left at its default, must not make old
    runs refuse to resume (add it to HASH_SINCE, or to HASH_EXEMPT for a place)."""
    cfg = load_config(ROOT / "configs/pretrain/world.yaml")
    assert config_hash(cfg) == "6d261c8b7335ea9b"
    cfg.data.bucket_pool = 4
    assert config_hash(cfg) != "6d261c8b7335ea9b"  # what it trains did change
