"""Unit tests for engine.config: defaults, YAML + dotted overrides, validation errors, describe()."""

import dataclasses

import pytest
from conftest import ROOT

from engine.config import Config, ConfigError, config_from_dict, describe, load_config


def _err(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides or [])
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.strip(), "empty error message"
    return msg


# ------------------------------------------------------------------------------------ defaults
def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.seed == 0
    assert cfg.name is None
    assert cfg.model.path == "builtin:tiny-countdown"
    assert cfg.data.train == "builtin:countdown" and cfg.data.test == "builtin:countdown"
    assert cfg.data.verifier is None
    assert cfg.data.prompt_template == "{prompt}"
    assert cfg.rollout.n == 8
    assert cfg.rollout.max_new_tokens == 64
    assert cfg.algorithm.name == "a3po"
    assert cfg.algorithm.ratio == 0.2
    assert cfg.algorithm.alpha_pos == 2.0 and cfg.algorithm.alpha_neg == 2.0
    assert cfg.algorithm.decay == "linear"
    assert cfg.algorithm.std_normalize is None
    assert cfg.algorithm.token_rules == []
    assert cfg.actor.lr == 1e-4
    assert cfg.actor.betas == [0.9, 0.999]
    assert cfg.actor.clip_ratio_high is None
    assert cfg.train.steps == 200
    assert cfg.train.store_tokens is True
    assert cfg.eval.k == [1, 4, 8]


def test_defaults_do_not_share_mutable_lists():
    a, b = load_config(), load_config()
    a.eval.k.append(99)
    a.algorithm.token_rules.append({"x": 1})
    assert b.eval.k == [1, 4, 8]
    assert b.algorithm.token_rules == []


# ------------------------------------------------------------------------------------ YAML + overrides
def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "seed: 7\n"
        "algorithm:\n"
        "  name: dapo\n"
        "  ratio: 0.3\n"
        "  std_normalize: true\n"
        "actor:\n"
        "  lr: 3.0e-5\n"
        "train:\n"
        "  steps: 50\n"
        "  store_tokens: true\n"
    )
    cfg = load_config(
        p,
        [
            "algorithm.name=grpo",
            "actor.lr=5e-5",
            "eval.k=[1,2]",
            "algorithm.std_normalize=null",
            "train.store_tokens=false",
        ],
    )
    assert cfg.seed == 7  # from the file
    assert cfg.algorithm.ratio == pytest.approx(0.3)  # from the file
    assert cfg.train.steps == 50  # from the file
    assert cfg.algorithm.name == "grpo"  # override beats the file
    assert isinstance(cfg.actor.lr, float) and cfg.actor.lr == pytest.approx(5e-5)
    assert cfg.eval.k == [1, 2]
    assert cfg.algorithm.std_normalize is None
    assert cfg.train.store_tokens is False


def test_file_only(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("actor:\n  lr: 3.0e-5\n")
    cfg = load_config(str(p))
    assert cfg.actor.lr == pytest.approx(3e-5)
    assert cfg.algorithm.name == "a3po"  # untouched default


def test_empty_yaml_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True),
        ("false", False),
        ("True", True),
        ("no", False),
        ("yes", True),
    ],
)
def test_bool_overrides(text, expected):
    assert load_config(None, [f"train.store_tokens={text}"]).train.store_tokens is expected


@pytest.mark.parametrize("text, expected", [("1", True), ("0", False)])
def test_bool_override_one_zero(text, expected):
    # the coercion accepts "1"/"0" for booleans; on the command line they must work too
    assert load_config(None, [f"train.store_tokens={text}"]).train.store_tokens is expected


def test_override_types():
    cfg = load_config(
        None,
        [
            "train.steps=12",
            "rollout.temperature=0",
            "algorithm.decay=cosine",
            "name=my_run-1.a",
            "algorithm.decay_steps=null",
            "actor.clip_ratio_high=0.28",
            "train.prompts_per_step=4.0",
        ],
    )
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.rollout.temperature == 0.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.algorithm.decay == "cosine"
    assert cfg.name == "my_run-1.a"
    assert cfg.algorithm.decay_steps is None
    assert cfg.actor.clip_ratio_high == pytest.approx(0.28)
    assert cfg.train.prompts_per_step == 4 and isinstance(cfg.train.prompts_per_step, int)


def test_later_override_wins():
    cfg = load_config(None, ["train.steps=3", "train.steps=9"])
    assert cfg.train.steps == 9


def test_token_rules_override():
    cfg = load_config(
        None,
        [
            "algorithm.name=token_weighted",
            "algorithm.token_rules=[{polarity: positive, metric: prob, end: low, ratio: 0.2, scale: 2}]",
        ],
    )
    assert cfg.algorithm.token_rules == [
        {"polarity": "positive", "metric": "prob", "end": "low", "ratio": 0.2, "scale": 2}
    ]
    rules = cfg.token_rules()
    assert len(rules) == 1 and rules[0].polarity == "positive" and rules[0].end == "low"


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["bogus=1"], "bogus"),
        (["algorithm.bogus=1"], "algorithm.bogus"),
        (["actor.lrr=1e-4"], "actor.lrr"),
        (["algorithm.name=nope"], "algorithm.name"),
        (["algorithm.ratio=-0.1"], "algorithm.ratio"),
        (["algorithm.ratio=0"], "algorithm.ratio"),
        (["algorithm.ratio=1.5"], "algorithm.ratio"),
        (["actor.lr=-1e-4"], "actor.lr"),
        (["actor.lr=0"], "actor.lr"),
        (["actor.lr=nan"], "actor.lr"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["train.steps=0"], "train.steps"),
        (["train.steps=true"], "train.steps"),
        (["train.steps=null"], "train.steps"),
        (["train.store_tokens=maybe"], "train.store_tokens"),
        (["rollout.n=0"], "rollout.n"),
        (["rollout.top_p=1.5"], "rollout.top_p"),
        (["algorithm.decay=weird"], "algorithm.decay"),
        (["actor.loss_agg_mode=mean"], "actor.loss_agg_mode"),
        (["actor.kl_type=k9"], "actor.kl_type"),
        (["rollout.backend=sglang"], "rollout.backend"),
        (["actor.betas=[0.9]"], "actor.betas"),
        (["eval.k=[0]"], "eval.k"),
        (["eval.k=3"], "eval.k"),
        (["model=3"], "model"),
        (["algorithm.token_rules=[{polarity: neutral, metric: prob, end: low}]"], "algorithm.token_rules[0]"),
        (
            ["algorithm.token_rules=[{polarity: positive, metric: prob, end: low, ratio: 2}]"],
            "algorithm.token_rules[0]",
        ),
        (
            ["algorithm.token_rules=[{polarity: positive, metric: prob, end: low, colour: red}]"],
            "algorithm.token_rules[0]",
        ),
        (["algorithm.token_rules=[3]"], "algorithm.token_rules[0]"),
        (["name=../x"], "name"),
        (["name=a/b"], "name"),
        (["data.prompt_template=Question: {question}"], "data.prompt_template"),
        (["actor.mini_batches=129"], "actor.mini_batches"),  # batch = 16 prompts x 8 rollouts = 128
        (["train.prompts_per_step=2", "rollout.n=2", "actor.mini_batches=5"], "actor.mini_batches"),
    ],
)
def test_error_names_key(overrides, key):
    msg = _err(overrides)
    assert f"'{key}'" in msg, msg


def test_eval_k_rejects_booleans():
    # YAML reads `true` as a bool, which Python also counts as an int; pass@k needs real ints
    msg = _err(["eval.k=[1, true]"])
    assert "'eval.k'" in msg, msg


def test_mini_batches_equal_to_batch_is_fine():
    assert load_config(None, ["actor.mini_batches=128"]).actor.mini_batches == 128


def test_ratio_one_is_allowed():
    assert load_config(None, ["algorithm.ratio=1"]).algorithm.ratio == 1.0


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("model: 3\n", "model"),
        ("bogus: 1\n", "bogus"),
        ("train:\n  bogus: 1\n", "train.bogus"),
        ("algorithm:\n  name: nope\n", "algorithm.name"),
        ("algorithm:\n  ratio: -0.2\n", "algorithm.ratio"),
        ("actor:\n  lr: 0\n", "actor.lr"),
        ("train:\n  steps: abc\n", "train.steps"),
        (
            "algorithm:\n  token_rules:\n    - {polarity: sideways, metric: prob, end: low}\n",
            "algorithm.token_rules[0]",
        ),
        ("name: ../x\n", "name"),
    ],
)
def test_yaml_error_names_key(tmp_path, yaml_text, key):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    msg = _err(path=p)
    assert f"'{key}'" in msg, msg


def test_yaml_top_level_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    msg = _err(path=p)
    assert "mapping" in msg


def test_malformed_yaml_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("algorithm:\n  name: [grpo\n  ratio: 0.2\n")
    msg = _err(path=p)
    assert "broken.yaml" in msg
    assert "YAML" in msg


def test_missing_config_file(tmp_path):
    msg = _err(path=tmp_path / "nowhere.yaml")
    assert "nowhere.yaml" in msg and "not found" in msg


def test_override_without_equals():
    msg = _err(["train.steps"])
    assert "train.steps" in msg


def test_override_with_empty_key():
    msg = _err(["=3"])
    assert "=3" in msg


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------ describe
def _leaf_keys(obj, prefix=""):
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _leaf_keys(v, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_describe_lists_every_key_with_help():
    text = describe()
    assert "algorithm.alpha_pos" in text
    assert "actor.clip_ratio_high" in text
    assert "epsilon_high" in text  # part of clip_ratio_high's help
    lines = text.splitlines()
    keys = _leaf_keys(Config())
    assert len(keys) > 50
    for key in keys:
        idx = [i for i, line in enumerate(lines) if line.startswith(f"{key} = ")]
        assert len(idx) == 1, key
        help_line = lines[idx[0] + 1]
        assert help_line.startswith("    ") and len(help_line.strip()) > 5, key


def test_describe_shows_defaults():
    text = describe()
    assert 'algorithm.name = "a3po"' in text
    assert "train.steps = 200" in text
    assert "eval.k = [1, 4, 8]" in text


# ------------------------------------------------------------------------------------ round trip
def test_round_trip_defaults():
    cfg = load_config()
    back = config_from_dict(cfg.to_dict())
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


def test_round_trip_non_default():
    cfg = load_config(
        None,
        [
            "algorithm.name=token_weighted",
            "name=abc",
            "actor.lr=2e-5",
            "eval.k=[1,2,16]",
            "algorithm.std_normalize=false",
            "actor.loss_agg_mode=seq-mean-token-sum",
            "algorithm.token_rules=[{polarity: negative, metric: entropy, end: high, ratio: 0.1, scale: 0.5}]",
            "algorithm.decay_steps=30",
            "train.store_tokens=false",
        ],
    )
    d = cfg.to_dict()
    back = config_from_dict(d)
    assert back == cfg
    assert back.algorithm.std_normalize is False
    assert back.algorithm.token_rules[0]["polarity"] == "negative"
    assert back.to_dict() == d


def test_config_from_dict_validates():
    d = load_config().to_dict()
    d["algorithm"]["name"] = "nope"
    with pytest.raises(ConfigError) as ei:
        config_from_dict(d)
    assert "'algorithm.name'" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"actor": {"lr": 0}})
    assert "'actor.lr'" in str(ei.value)


def test_demo_config_makes_the_clip_act():
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"))
    assert cfg.actor.mini_batches * cfg.actor.ppo_epochs >= 2  # the ratio moves away from 1 after the first update
    assert cfg.model.path == "builtin:tiny-countdown" and cfg.data.train == "builtin:countdown"


def test_unknown_verifier_is_one_line():
    with pytest.raises(ConfigError, match="data.verifier"):
        load_config(None, ["data.verifier=chess"])
