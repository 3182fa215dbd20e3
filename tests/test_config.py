"""The config: unknown keys and presets named, shapes that do not fit refused, overrides, YAML round trip."""
from __future__ import annotations

import pytest

from grandmother.config import ConfigError, load_config, read_config, save_config


def test_unknown_key_and_preset_are_named():
    with pytest.raises(ConfigError, match=r"model\.sparsityy"):
        load_config("small", ["model.sparsityy=0.2"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.maps_"):
        load_config("small", ["model.stages.0.maps_=3"])
    with pytest.raises(ConfigError, match="no_such_preset"):
        load_config("no_such_preset")
    # Paths that do not fit the structure are the same kind of typo.
    for bad in ("model.stages.maps=4", "model.stages.7.maps=4", "model.sparsity.x=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("small", [bad])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  image_size: 32\n  lcn_cc: 0.1\n")
    with pytest.raises(ConfigError, match=r"model\.lcn_cc"):
        load_config(str(path))


def test_field_larger_than_input_names_the_stage():
    # small: stage 2's input is 8x16x16 (32 -> 25 -> 23 -> 18 -> 16), so a field of 20 fits stage 0 but not 2.
    # config.py checks values only; the shapes are checked by the layer that builds the network (nn.shapes)
    from grandmother.nn.shapes import check_network
    with pytest.raises(ConfigError, match=r"stages\[2\]\.receptive_field=20.*16x16"):
        check_network(load_config("small", ["model.stages.2.receptive_field=20"]).model)
    with pytest.raises(ConfigError, match=r"stages\[0\]"):
        check_network(load_config("small", ["model.stages.0.receptive_field=33"]).model)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.lcn_size=4"):
        check_network(load_config("small", ["model.stages.1.lcn_size=4"]).model)


@pytest.mark.parametrize("bad,needle", [("model.stages.0.lcn_sigma=0", r"stages\[0\]\.lcn_sigma=0"),
                                        ("model.lcn_c=0", r"model\.lcn_c=0"), ("model.pool_eps=-1", "pool_eps=-1"),
                                        ("model.sparsity=-0.1", r"sparsity=-0\.1")])
def test_nonpositive_constants_are_refused(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("small", [bad])


def test_missing_run_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config(tmp_path / "config.yaml")


def test_overrides():
    cfg = load_config("small", ["model.stages.*.maps=4", "train.lr=0.1", "model.lcn=false"])
    assert [s.maps for s in cfg.model.stages] == [4, 4, 4]
    assert cfg.train.lr == 0.1 and isinstance(cfg.train.lr, float)
    assert cfg.model.lcn is False
    assert cfg.model.stages[0].receptive_field == 8  # untouched settings keep the preset's values
    cfg = load_config("paper", {"model.stages.1.stride": 1, "train.batch_size": 7})
    assert cfg.train.batch_size == 7 and cfg.preset == "paper"
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("small", ["train.lr=fast"])


@pytest.mark.parametrize("preset,overrides", [("small", []), ("paper", ["model.stages.*.maps=3", "train.lr=0.5"])])
def test_yaml_round_trip(tmp_path, preset, overrides):
    cfg = load_config(preset, overrides)
    save_config(cfg, tmp_path / "config.yaml")
    again = read_config(tmp_path / "config.yaml")
    assert again == cfg
    assert load_config(str(tmp_path / "config.yaml")).model == cfg.model
