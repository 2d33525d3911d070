import json

import pytest
from torch import nn

import reparam
from reparam import ConfigError, LowRankConfig, parse_recipe, plan_conversion


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)


LR = {"method": "low_rank", "rank": 2}


def planned(recipe, model=None):
    return {p.name: p.config for p in plan_conversion(model or Net(), parse_recipe(recipe))}


@pytest.mark.parametrize("pattern, expected", [
    ("head", ["head"]),
    ("blocks.0.query", ["blocks.0.query"]),
    ("blocks.*.query", ["blocks.0.query", "blocks.1.query"]),
    ("blocks.?.key", ["blocks.0.key", "blocks.1.key"]),
    ("re:blocks\\.1\\.(query|out)", ["blocks.1.query", "blocks.1.out"]),
    ("Linear", ["blocks.0.query", "blocks.0.key", "blocks.0.out",
                "blocks.1.query", "blocks.1.key", "blocks.1.out", "head"]),
    # A glob selects the supported layers under a container, not the container.
    ("blocks.*", ["blocks.0.query", "blocks.0.key", "blocks.0.out",
                  "blocks.1.query", "blocks.1.key", "blocks.1.out"]),
])
def test_patterns_select_expected_layers(pattern, expected):
    assert list(planned({pattern: LR})) == expected


def test_regex_must_match_whole_name():
    with pytest.raises(ConfigError, match="matches no module"):
        planned({"re:query": LR})


def test_first_matching_rule_wins_and_none_leaves_alone():
    plan = planned({"blocks.0.*": None, "blocks.*.out": {"method": "low_rank", "rank": 1}, "Linear": LR})
    assert list(plan) == ["blocks.1.query", "blocks.1.key", "blocks.1.out", "head"]
    assert plan["blocks.1.out"].rank == 1 and plan["head"].rank == 2


def test_list_form_with_ignore_and_config_objects():
    recipe = [{"targets": ["Linear"], "ignore": ["head", "re:.*key"], "method": "low_rank", "rank": 3},
              {"targets": "head", "method": None}]
    plan = planned(recipe)
    assert list(plan) == ["blocks.0.query", "blocks.0.out", "blocks.1.query", "blocks.1.out"]
    assert planned({"head": LowRankConfig(rank=1)})["head"] == LowRankConfig(rank=1)


def test_json_and_yaml_files(tmp_path):
    recipe = {"blocks.*.query": LR, "head": None}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    (tmp_path / "r.yaml").write_text("blocks.*.query:\n  method: low_rank\n  rank: 2\nhead: null\n")
    assert planned(str(tmp_path / "r.json")) == planned(tmp_path / "r.yaml") == planned(recipe)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_recipe(str(tmp_path / "missing.yaml"))
    (tmp_path / "r.txt").write_text("{}")
    with pytest.raises(ConfigError, match="must end in .json, .yaml or .yml"):
        parse_recipe(tmp_path / "r.txt")


@pytest.mark.parametrize("recipe, message", [
    ({}, "the recipe is empty"),
    ({"head": {"rank": 2}}, "must be a dict with a 'method' key"),
    ({"head": {"method": "magic"}}, r"unknown method 'magic'; known methods are \[.*'low_rank'"),
    ({"head": {"method": "low_rank", "rank": 2, "rnak": 3}},
     r"unknown key\(s\) \['rnak'\] for method 'low_rank'; valid keys are \['size_ratio', 'rank'"),
    ({"head": {"method": "low_rank", "rank": 0}}, "rank=0 must be a positive integer"),
    ({"head": {"method": "low_rank"}}, "set size_ratio .* or \\['rank'\\]"),
    ({"head": {"method": "low_rank", "rank": 2, "size_ratio": 0.5}}, "not both"),
    ({"head": {"method": "low_rank", "size_ratio": 1.5}}, r"size_ratio=1.5 must be a number in \(0.0, 1.0\]"),
    ({"head": {"method": "low_rank", "rank": 2, "factorizer": "qr"}}, "factorizer='qr' is not one of"),
    ({"re:(": LR}, "is not a valid regex"),
    ([{"method": "low_rank"}], "a list recipe holds rules like"),
    # Issue 12, item 5: a rule without 'method' was a silent exclusion that converted nothing.
    ([{"targets": "Linear", "scheme": "W4A16"}],
     r"has no 'method'; set method: <name> \(one of \[.*'low_rank'.*\]\) with its config keys, or method: null "
     r"to leave the targets alone. Keys \['scheme'\] are not rule keys \['targets', 'ignore', 'method'\]"),
    ([{"targets": "Linear", "methd": "low_rank", "rank": 2}], r"Keys \['methd', 'rank'\] are not rule keys"),
    ([{"targets": "head", "method": None, "rank": 2}],
     r"has method: null \(leave alone\) but also \['rank'\]; an exclusion rule takes only"),
    ([{"targets": "head", "method": "low_rank", "rank": 2, "ingore": "x"}],
     r"unknown key\(s\) \['ingore'\] for method 'low_rank'; valid keys are"),
])
def test_invalid_recipes_name_the_problem(recipe, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(recipe)


def test_list_rule_excludes_only_with_explicit_null(tmp_path):
    (tmp_path / "r.yaml").write_text("- targets: head\n  method: null\n"
                                     "- targets: Linear\n  method: low_rank\n  rank: 2\n")
    assert "head" not in planned(tmp_path / "r.yaml") and len(planned(tmp_path / "r.yaml")) == 6


def test_config_json_round_trip():
    config = LowRankConfig(size_ratio=0.25, factorizer="asvd", asvd_alpha=0.75)
    assert LowRankConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_callable_filter_and_suffix_patterns():
    def wide_inputs(module, name):  # torchao's filter_fn(module, fqn) convention
        return isinstance(module, nn.Linear) and module.in_features == 8 and not name.endswith("key")

    assert sorted(planned({wide_inputs: LR})) == ["blocks.0.out", "blocks.0.query", "blocks.1.out", "blocks.1.query"]
    assert sorted(planned({"suffix:query": LR, "suffix:0.key": LR})) == ["blocks.0.key", "blocks.0.query",
                                                                          "blocks.1.query"]
    assert sorted(planned([{"targets": [wide_inputs], "ignore": "suffix:out", "method": "low_rank", "rank": 2}])) \
        == ["blocks.0.query", "blocks.1.query"]
    assert str(parse_recipe({wide_inputs: LR})[0]) == "<filter wide_inputs>"


def test_presets_expand_to_their_configs_and_accept_overrides():
    from reparam.presets import PRESETS

    configs = planned({"head": "w4-gptq", "blocks.*.query": "shift_add-3bit"})
    assert configs["head"] == reparam.AffineConfig(bits=4, fit="gptq")
    assert configs["blocks.0.query"] == reparam.ShiftAddConfig(bits=3)
    assert planned([{"targets": "head", "method": "W4A16", "group_size": 32}])["head"] == \
        reparam.AffineConfig(bits=4, symmetric=True, group_size=32, fit="gptq")
    assert all(parse_recipe({"head": name}) for name in PRESETS)  # every preset is a valid config
    with pytest.raises(ConfigError, match=r"unknown preset 'w5-gptq'; presets are \[.*'w4-gptq'.*\]; or give a "
                                          r"config dict with a 'method' key, one of \["):
        parse_recipe({"head": "w5-gptq"})


@pytest.mark.parametrize("method", reparam.known_methods())
def test_every_config_field_is_documented_in_help(method):
    import dataclasses

    config = reparam.get_method(method).config
    attributes = config.__doc__.split("Attributes:")[1]
    documented = [line.split(":")[0].strip() for line in attributes.strip().splitlines()]
    assert documented == [f.name for f in dataclasses.fields(config)]
