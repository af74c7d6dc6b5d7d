"""Run configuration: one YAML file per run plus dotted ``key=value`` overrides.

Every key has a type, a default, a documented meaning and, where one exists, the name verl or TRL
users know (``clip_ratio_high`` = TRL ``epsilon_high``; ``rollout.n`` = TRL ``num_generations``).
Unknown keys and out-of-range values fail with one line naming the key.

    a3po train --config configs/demo.yaml algorithm.name=grpo actor.lr=5e-5

``a3po config`` prints every key with its help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from engine.errors import ConfigError
from engine.rollout.registry import BACKENDS
from engine.shaping.advantage import DECAYS, TokenRule
from engine.shaping.algorithms import ALGORITHMS, ESTIMATORS, ResolvedAlgorithm
from engine.store.store import StoreError, check_name
from engine.tasks.reward import VERIFIERS
from engine.update.loss import AGG_MODES

# Ranges of the numeric keys. The store keeps steps, token positions, lengths, k and counts in int32
# columns (and run.json's last_step/total_steps in the runs table's int32); every bound below sits
# far inside that, at what one run can sensibly do, so a typo such as train.steps=99999999999 is
# refused before anything is written instead of poisoning the store.
MAX_STEPS = 1_000_000  # train.steps and every "every N steps" key
MAX_BATCH = 65_536  # prompts per step, mini-batches, responses per step
MAX_GROUP = 1_024  # rollout.n
MAX_TOKENS = 131_072  # response / prompt lengths, logit chunk
MAX_K = 1_024  # pass@k: n = max(k) samples for every test prompt
MAX_PROMPTS = 10_000_000  # eval.n_prompts
MAX_SEED = 2**31 - 1  # seeds: int32 like the app's seed field; numpy and torch accept it
MAX_TEMPERATURE = 100.0
DEVICE_RE = r"^(auto|cpu|mps|cuda(:\d{1,3})?)$"
FIX = "`a3po config` lists every key with its type and range"


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    path: str = _f(
        "builtin:tiny-countdown",
        "Policy: 'builtin:tiny-countdown' (the embedded Countdown-lite model, "
        "data/tiny-countdown), 'builtin:tiny' (the arith model, data/tiny-model), a local HF folder, "
        "or a Hugging Face model id (needs network or a local HF cache).",
    )
    dtype: str = _f(
        "auto",
        "Parameter dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    device: str = _f(
        "auto",
        "auto (cuda when available), cpu, cuda, cuda:N, mps.",
        pattern=DEVICE_RE,
        fix="use auto, cpu, cuda, cuda:N or mps",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (large models on GPU).")
    fast_forward: bool = _f(
        True,
        "Run Llama-family policies (llama, mistral, qwen2, qwen3; full attention) through our own forward "
        "(engine/model/fast_forward.py): the update skips padding and computes each prompt once for its whole group, "
        "and the kv engine decodes with it. Same logits as the model's forward to float rounding. false = "
        "always the model's own forward (other architectures, sliding windows, attention dropout and gradient "
        "checkpointing use it anyway).",
    )
    logit_chunk: int = _f(
        1024, "Rows per chunk for log-prob/entropy, bounds the float32 softmax to chunk x vocab.", min=1, max=MAX_TOKENS
    )


@dataclass
class DataConfig:
    train: str = _f(
        "builtin:countdown", "Training prompts: 'builtin:countdown', 'builtin:arith' or a local .jsonl/.parquet file."
    )
    test: str = _f(
        "builtin:countdown", "Held-out prompts for evaluation: 'builtin:countdown', 'builtin:arith' or a local file."
    )
    verifier: str | None = _f(
        None,
        "Reward: 'math' (math-verify on the last \\boxed{}) or 'countdown' (the "
        "Countdown-lite step verifier). null = the built-in task's own, 'math' for files.",
        choices=[*VERIFIERS, None],
    )
    prompt_key: str = _f("prompt", "Column holding the prompt text (GSM8K/MATH exports: 'question'/'problem').")
    answer_key: str = _f("answer", "Column holding the gold answer checked by the verifier.")
    prompt_template: str = _f(
        "{prompt}", "Python format string applied to each prompt, e.g. '{prompt}\\nAnswer in \\\\boxed{{}}.'"
    )
    chat_template: bool = _f(False, "Wrap prompts with the tokenizer's chat template (instruct models).")
    max_prompt_tokens: int = _f(256, "Prompts longer than this are left-truncated.", min=1, max=MAX_TOKENS)


@dataclass
class RolloutConfig:
    backend: str = _f(
        "hf",
        "Rollout backend: 'hf' (transformers generate with KV cache), 'kv' (our own KV-cache "
        "engine: rows retire at EOS, records the old-policy log-probs so the trainer can skip "
        "that forward) or 'vllm' (GPU, [gpu] extra).",
        choices=list(BACKENDS),
    )
    n: int = _f(8, "Rollouts per prompt, the group size G (verl rollout.n, TRL num_generations).", min=1, max=MAX_GROUP)
    temperature: float = _f(
        1.0,
        "Sampling temperature for training rollouts. Log-probs, entropies, key tokens and "
        "the PPO ratio are computed on logits / temperature, the distribution actually "
        "sampled (as verl does).",
        min=0.0,
        max=MAX_TEMPERATURE,
    )
    top_p: float = _f(1.0, "Nucleus sampling; 1.0 disables it.", min=0.0, max=1.0)
    top_k: int = _f(0, "Top-k sampling; 0 disables it (transformers defaults to 50 otherwise).", min=0, max=MAX_TOKENS)
    max_new_tokens: int = _f(64, "Maximum response length in tokens (DAPO's L_max).", min=1, max=MAX_TOKENS)
    workers: int = _f(
        1,
        "backend=kv on CPU: decode in this many processes, each with train.threads / workers threads and "
        "a contiguous share of the prompts (the policy's weights are shared, not copied). On 2 cores, 2 "
        "workers generate in about 0.9x the time of 1, and vary less from run to run (a decode step is many "
        "kernels too small to split across threads). Each share samples with its own seed, so the draw differs from workers=1 (same "
        "distribution; greedy output is identical). Costs one process start (a few seconds) per run.",
        min=1,
        max=64,
    )
    native_kernels: bool = _f(
        True,
        "backend=kv on CPU, float32, with fast_forward: run each decode step's attention, rotary embedding and "
        "cache write, norms and gated activation in C kernels (engine/model/csrc/cpu_kernels.c, built on first use "
        "with the system's C compiler, x86-64 with AVX2/FMA) instead of chains of small torch kernels; "
        "generation took 0.69x the time on the embedded arith and Countdown-lite workloads (bench/bench_decode.py). "
        "Same results to float32 rounding. Without a compiler or such a CPU it stays off by itself "
        "(engine.model.cpu_kernels.status() says why); false = torch's route always.",
    )
    vllm_gpu_memory_utilization: float = _f(
        0.35,
        "backend=vllm: share of GPU memory the colocated engine may take "
        "(weights + KV cache); the policy and optimiser need the rest "
        "(TRL vllm_gpu_memory_utilization).",
        min=0.0,
        max=1.0,
        open_min=True,
    )
    vllm_sleep: bool = _f(
        False,
        "backend=vllm: release the engine's weights and KV cache while the policy trains "
        "(vLLM sleep level 2) and wake it for each generation (TRL vllm_enable_sleep_mode).",
    )


@dataclass
class AlgorithmConfig:
    name: str = _f(
        "a3po",
        "Algorithm: grpo, dr_grpo, dapo, psr, nsr, w_reinforce, polarity_weighted, "
        "token_weighted, fork_tokens, a3po (see engine/shaping/algorithms.py).",
    )
    w_pos: float = _f(
        1.0,
        "Sample-level weight on positive (correct) responses. Tang et al. 2025: only the ratio "
        "w_pos/w_neg changes the update direction; P2N1 = (2, 1). Combines with every estimator.",
        min=0.0,
    )
    w_neg: float = _f(1.0, "Sample-level weight on negative (incorrect) responses (see w_pos).", min=0.0)
    lam: float = _f(0.1, "W-REINFORCE reward for correct responses (Zhu et al. 2025; recommended 0.1).", min=0.0)
    std_normalize: bool | None = _f(
        None, "Divide group advantages by the group std (GRPO). null = the algorithm's default (false for dr_grpo)."
    )
    ratio: float = _f(
        0.2, "A3PO: share of each response's tokens that are key tokens (paper: 0.2).", min=0.0, max=1.0, open_min=True
    )
    alpha_pos: float = _f(
        2.0,
        "A3PO: initial scale alpha+_0 on the lowest-probability tokens of correct responses. "
        "Chosen by the polarity study on the embedded task (README); the authors' code uses 0.5-5.",
        min=0.0,
    )
    alpha_neg: float = _f(
        2.0, "A3PO: initial scale alpha-_0 on the highest-probability tokens of incorrect responses.", min=0.0
    )
    decay: str = _f(
        "linear",
        "A3PO schedule d(s/S) in alpha(s) = 1 + (alpha0 - 1) d(s/S): constant, linear, cosine, exponential.",
        choices=sorted(DECAYS),
    )
    decay_rate: float = _f(5.0, "Rate of the exponential decay exp(-rate * s/S).", min=0.0)
    decay_steps: int | None = _f(None, "Horizon S of the decay; null = the run's train.steps.", min=1, max=MAX_STEPS)
    token_rules: list = _f(
        [],
        "token_weighted: list of rules {polarity, metric, end, ratio, scale}; also added on top "
        "of any other algorithm. Example: [{polarity: positive, metric: prob, end: low, ratio: 0.2, scale: 2}].",
    )
    fork_quantile: float = _f(
        0.2,
        "fork_tokens: train only on this top share of batch entropy (Wang et al. 2025; TRL top_entropy_quantile).",
        min=0.0,
        max=1.0,
        open_min=True,
    )
    dynamic_sampling: bool | None = _f(
        None,
        "DAPO: drop groups whose rewards are all equal and sample more prompts to refill. "
        "null = the algorithm's default (on for dapo, fork_tokens).",
    )
    max_gen_batches: int = _f(4, "Dynamic sampling: at most this many generation rounds per step.", min=1, max=1000)
    overlong_buffer: int | None = _f(
        None,
        "DAPO soft overlong penalty length L_cache (0 disables); null = algorithm default (dapo: max_new_tokens // 4).",
        min=0,
        max=MAX_TOKENS,
    )


@dataclass
class ActorConfig:
    lr: float = _f(
        1e-4,
        "AdamW learning rate. On the tiny model 3e-5..1e-4 learns; 3e-4 degrades; 1e-3 collapses.",
        min=0.0,
        open_min=True,
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    grad_clip: float = _f(1.0, "Max global grad norm (verl actor.grad_clip).", min=0.0)
    ppo_epochs: int = _f(1, "Passes over each batch (verl ppo_epochs, TRL num_iterations).", min=1, max=100)
    mini_batches: int = _f(
        1, "Optimizer steps per epoch: the batch is split into this many mini-batches.", min=1, max=MAX_BATCH
    )
    clip_ratio_low: float | None = _f(None, "PPO epsilon_low (TRL epsilon). null = algorithm default (0.2).", min=0.0)
    clip_ratio_high: float | None = _f(
        None,
        "PPO epsilon_high, DAPO clip-higher (TRL epsilon_high). null = algorithm "
        "default (0.28 for dapo/a3po, 0.2 for grpo).",
        min=0.0,
    )
    clip_ratio_c: float | None = _f(
        3.0, "Dual-clip bound for negative advantages (Ye et al. 2020; verl clip_ratio_c); null disables.", min=1.0
    )
    loss_agg_mode: str | None = _f(
        None,
        "token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm. "
        "null = algorithm default (dr_grpo: seq-mean-token-sum-norm, else token-mean).",
        choices=list(AGG_MODES) + [None],
    )
    kl_coef: float = _f(
        0.0, "KL-to-reference penalty coefficient (verl kl_loss_coef); 0 skips the reference model.", min=0.0
    )
    kl_type: str = _f("low_var_kl", "KL estimator: k1, k2, low_var_kl (k3).", choices=["k1", "k2", "low_var_kl"])
    rollout_is: str | None = _f(
        None,
        "Truncated importance sampling against the training-inference mismatch (verl "
        "algorithm.rollout_correction.rollout_is): 'token' weights each token's loss by "
        "min(pi_train/pi_rollout, rollout_is_threshold), the ratio of the trainer's old-policy probability to "
        "the one the rollout engine sampled with (tokens.rollout_logprob); null = off. Needs a backend that "
        "records sampler log-probs (vllm, kv; a no-op with kv's recorded log-probs, where the ratio is 1).",
        choices=["token", None],
    )
    rollout_is_threshold: float = _f(
        2.0,
        "Cap of the truncated importance weight (verl rollout_is_threshold, default 2.0); "
        "used with actor.rollout_is=token.",
        min=1.0,
        max=1e6,
    )
    recompute_old_logprobs: bool = _f(
        False,
        "Recompute the old-policy log-probs with a forward pass even when the "
        "rollout backend recorded them (rollout.backend=kv); verl always recomputes.",
    )
    split_update: bool = _f(
        True,
        "With rollout.workers > 1: split each mini-batch's forward/backward between the same CPU processes "
        "(about equal tokens each, cut at a row: a group may be split, its prompt then computed by both) "
        "and add their gradients before clipping and the optimizer step; the same gradient to float "
        "rounding. In single-pass mode (ppo_epochs = mini_batches = 1) the old policy's log-probs are then "
        "the rollout's recorded ones (same weights) instead of the loss forward's own. No effect with one "
        "worker.",
    )
    skip_zero_advantage: bool = _f(
        True,
        "Leave out of the update's forward/backward the rows whose every token has advantage 0 and no KL "
        "term (zero-variance groups under GRPO-style advantages): their loss and gradient are exactly 0, "
        "so the step's gradient, loss and optimizer state are unchanged. approx_kl is then over the "
        "rows that ran; clipfrac keeps its meaning (a zero-advantage token is never clipped). With "
        "rollout.backend=kv and one mini-batch the old log-probs are then the recorded ones. "
        "false: every row runs, as in verl and TRL.",
    )
    micro_batch_tokens: int = _f(
        0,
        "Most prompt + response tokens in one forward/backward of the update: each process's rows of a "
        "mini-batch run as micro-batches of whole groups (gradient accumulation; the same gradient to "
        "float rounding). 0 = no limit. It bounds activation memory, like verl's ppo_max_token_len_per_gpu "
        "(16384 there); on the embedded CPU workload it saved no time in whole trainer steps.",
        min=0,
        max=MAX_TOKENS,
    )


@dataclass
class TrainConfig:
    steps: int = _f(200, "Training steps (one batch of prompts each).", min=1, max=MAX_STEPS)
    prompts_per_step: int = _f(
        16, "Prompts per step; the batch has prompts_per_step x rollout.n responses.", min=1, max=MAX_BATCH
    )
    eval_every: int = _f(
        25, "Evaluate on the test split every N steps (0 = only at start and end).", min=0, max=MAX_STEPS
    )
    checkpoint_every: int = _f(
        25, "Save a resumable checkpoint every N steps (0 = only at the end).", min=0, max=MAX_STEPS
    )
    compact_every: int = _f(
        100, "Merge per-step store files every N steps (at the next checkpoint).", min=1, max=MAX_STEPS
    )
    threads: int = _f(2, "torch CPU threads (fixed so a seed reproduces the same run).", min=1, max=1024)
    store_tokens: bool = _f(
        True, "Store every token row (id, text, log-prob, entropy, raw/shaped advantage, key flag)."
    )
    save_final_model: bool = _f(True, "Save the final policy in HF format under the run folder.")


@dataclass
class EvalConfig:
    n_prompts: int = _f(200, "Test prompts used per evaluation (0 = all).", min=0, max=MAX_PROMPTS)
    k: list = _f(
        [1, 4, 8],
        "pass@k values (unbiased estimator, Chen et al. 2021); n = max(k) samples per prompt.",
        item_min=1,
        item_max=MAX_K,
    )
    final_k: list = _f(
        [],
        "pass@k values for the final evaluation only (e.g. [1, 2, 4, ..., 64] for the reasoning-"
        "boundary curve); empty = eval.k.",
        item_min=1,
        item_max=MAX_K,
    )
    temperature: float = _f(
        1.0, "Temperature of the pass@k samples (greedy accuracy is also reported).", min=0.0, max=MAX_TEMPERATURE
    )
    max_new_tokens: int | None = _f(None, "null = rollout.max_new_tokens.", min=1, max=MAX_TOKENS)
    at_start: bool = _f(
        True,
        "Also evaluate the initial policy (step 0). A study whose claims compare final "
        "accuracies turns it off: the start is the same model in every run.",
    )


@dataclass
class Config:
    seed: int = _f(
        0, "Seed for prompt order, sampling and init; the same seed gives the same run on CPU.", min=0, max=MAX_SEED
    )
    name: str | None = _f(None, "Run id in the store (letters, digits, . _ -); null = timestamp-algorithm.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def token_rules(self) -> list[TokenRule]:
        return [TokenRule(**r) for r in self.algorithm.token_rules]


# ------------------------------------------------------------------------------------------------
def _coerce(value: Any, typ, key: str):
    """Convert a YAML/CLI value to the field's declared type (``typ`` from type hints)."""
    import types
    import typing

    args = typing.get_args(typ)
    optional = type(None) in args
    base = (
        [a for a in args if a is not type(None)][0]
        if args and (typing.get_origin(typ) in (typing.Union, types.UnionType))
        else typ
    )
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if base is list:
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as e:
                    raise ConfigError(
                        f"config key {key!r}: {value!r} is not a YAML list ({_yaml_problem(e)}) — "
                        "write it like [1, 4, 8]"
                    ) from None
            if not isinstance(value, list):
                raise ValueError
            return value
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(
            f"config key {key!r}: expected {getattr(base, '__name__', base)}, got {_short(value)} — {FIX}"
        ) from None
    return value


def _short(value, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def _yaml_problem(e: Exception) -> str:
    """The first line of a YAML error (PyYAML's messages span several lines)."""
    return str(getattr(e, "problem", None) or str(e).strip().splitlines()[0] or type(e).__name__)


def _range(md: dict) -> str:
    lo, hi = md.get("min"), md.get("max")
    if lo is not None and hi is not None and not md.get("open_min"):
        return f"between {lo} and {hi}"
    parts = [
        f"{'>' if md.get('open_min') else '>='} {lo}" if lo is not None else "",
        f"<= {hi}" if hi is not None else "",
    ]
    return " and ".join(p for p in parts if p)


def _check(f: dataclasses.Field, value, key: str):
    """The field's own constraints from its metadata: choices, numeric range, pattern, list items."""
    import re

    md = f.metadata
    if value is None:
        return
    if "choices" in md and value not in md["choices"]:
        raise ConfigError(
            f"config key {key!r}: {_short(value)} is not one of {[c for c in md['choices'] if c is not None]} "
            f"— pick one of those"
        )
    if isinstance(value, str) and "pattern" in md and not re.match(md["pattern"], value):
        raise ConfigError(f"config key {key!r}: {_short(value)} is not valid — {md.get('fix', md['help'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value} — {FIX}")
        lo, hi = md.get("min"), md.get("max")
        if (lo is not None and (value < lo or (md.get("open_min") and value == lo))) or (hi is not None and value > hi):
            raise ConfigError(f"config key {key!r} must be {_range(md)}, got {_short(value)} — {FIX}")
    if isinstance(value, list) and ("item_min" in md or "item_max" in md):
        lo, hi = md.get("item_min"), md.get("item_max")
        for v in value:
            if (
                not isinstance(v, int)
                or isinstance(v, bool)
                or (lo is not None and v < lo)
                or (hi is not None and v > hi)
            ):
                raise ConfigError(
                    f"config key {key!r} must list integers between {lo} and {hi}, got {_short(value)} — {FIX}"
                )


def _apply(obj, data: dict, prefix: str = ""):
    hints = get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping of keys, got {_short(data)} "
            f"— write it as 'key: value' lines ({FIX})"
        )
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"did you mean {prefix + close[0]!r}?" if close else FIX
            raise ConfigError(f"unknown config key {key!r} — {hint}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            val = _coerce(v, hints[k], key)
            _check(fields[k], val, key)
            setattr(obj, k, val)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value — write e.g. train.steps=20")
    k, v = text.split("=", 1)
    if not k.strip():
        raise ConfigError(f"override {text!r} has an empty key — write e.g. train.steps=20")
    try:
        val = yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        val = v
    return k.strip().split("."), val


def read_config_file(p: Path) -> dict:
    """The YAML mapping in ``p``; every way the file can be wrong is one ConfigError line."""
    if not p.exists():
        raise ConfigError(f"config file not found: {p} — pass an existing YAML file, e.g. --config configs/demo.yaml")
    if p.is_dir():
        raise ConfigError(f"config path {p} is a folder — pass a YAML file, e.g. --config configs/demo.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}) — save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror} — check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {p} is not valid YAML{where}: {_yaml_problem(e)} — fix the YAML syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__} — {FIX}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validated as a whole."""
    cfg = Config()
    if path is not None:
        _apply(cfg, read_config_file(Path(path)))
    for ov in overrides or []:
        keys, val = parse_override(ov)
        nested: Any = val
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks (single fields are checked as they are set)."""
    if cfg.algorithm.name not in ALGORITHMS:
        raise ConfigError(
            f"config key 'algorithm.name': unknown algorithm {_short(cfg.algorithm.name)} — "
            f"choose one of {', '.join(sorted(ALGORITHMS))}"
        )
    for i, r in enumerate(cfg.algorithm.token_rules):
        if not isinstance(r, dict):
            raise ConfigError(
                f"config key 'algorithm.token_rules[{i}]' must be a mapping — write it as "
                "{polarity: positive, metric: prob, end: low, ratio: 0.2, scale: 2}"
            )
        try:
            TokenRule(**r)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'algorithm.token_rules[{i}]': {str(e).splitlines()[0]} — {FIX}") from None
    if len(cfg.actor.betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in cfg.actor.betas
    ):
        raise ConfigError(
            f"config key 'actor.betas' must be two numbers in [0, 1), got {_short(cfg.actor.betas)} — e.g. [0.9, 0.999]"
        )
    if cfg.actor.rollout_is is not None and cfg.rollout.backend == "hf":
        raise ConfigError(
            "config key 'actor.rollout_is' needs the sampler's log-probs, which rollout.backend=hf does not "
            "record — use rollout.backend=vllm or kv, or actor.rollout_is=null"
        )
    if cfg.rollout.workers > 1 and cfg.rollout.backend != "kv":
        raise ConfigError(
            f"config key 'rollout.workers' ({cfg.rollout.workers}) needs rollout.backend=kv, got "
            f"{cfg.rollout.backend!r} — set rollout.backend=kv or rollout.workers=1"
        )
    if not cfg.eval.k:
        raise ConfigError("config key 'eval.k' is empty — give at least one k, e.g. [1, 4, 8]")
    batch = cfg.train.prompts_per_step * cfg.rollout.n
    if batch > MAX_BATCH:
        raise ConfigError(
            f"train.prompts_per_step x rollout.n = {batch} responses per step exceeds {MAX_BATCH} — lower one of them"
        )
    if cfg.actor.mini_batches > batch:
        raise ConfigError(
            f"config key 'actor.mini_batches' ({cfg.actor.mini_batches}) exceeds the batch size ({batch}) "
            "— use at most train.prompts_per_step x rollout.n"
        )
    if cfg.name is not None:
        try:
            check_name(cfg.name)
        except StoreError as e:
            raise ConfigError(f"config key 'name': {e}") from None
    for key in ("model.path", "data.train", "data.test", "data.prompt_key", "data.answer_key"):
        sec, k = key.split(".")
        if not str(getattr(getattr(cfg, sec), k)).strip():
            raise ConfigError(f"config key {key!r} is empty — {FIX}")
    check_template(cfg.data.prompt_template)


def check_value(key: str, value, flag: str | None = None):
    """Check ``value`` against the constraints of config key ``key`` (e.g. ``"eval.temperature"``).

    The CLI's own flags (``a3po eval --temperature``) reuse the config's ranges this way, so one table
    of ranges covers both; ``flag`` names the flag in the message instead of the key."""
    obj: Any = Config()
    *sections, name = key.split(".")
    for sec in sections:
        obj = getattr(obj, sec)
    f = {f.name: f for f in dataclasses.fields(obj)}[name]
    try:
        _check(f, value, key)
    except ConfigError as e:
        if flag is None:
            raise
        raise ConfigError(
            str(e).replace(f"config key {key!r}", flag, 1).replace(FIX, "pick a value in that range")
        ) from None
    return value


def resolved_from_dict(d: dict, where: str = "resolved algorithm") -> ResolvedAlgorithm:
    """A ``ResolvedAlgorithm`` rebuilt from its ``to_dict()`` output (run.json's ``resolved``, a JSON shipped
    to verl workers), checked with the config's own ranges; a bad value raises a one-line ``ConfigError``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__} — pass ResolvedAlgorithm.to_dict()")
    names = [f.name for f in dataclasses.fields(ResolvedAlgorithm)]
    unknown, missing = sorted(set(d) - set(names)), [n for n in names if n not in d]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise ConfigError(f"{where}: {what} — pass the whole dict that ResolvedAlgorithm.to_dict() wrote")
    if d["name"] not in ALGORITHMS:
        raise ConfigError(f"{where}: unknown algorithm {d['name']!r} — pick one of {sorted(ALGORITHMS)}")
    if d["estimator"] not in ESTIMATORS:
        raise ConfigError(f"{where}: unknown estimator {d['estimator']!r} — pick one of {sorted(ESTIMATORS)}")
    out = dict(d)
    for f in dataclasses.fields(ResolvedAlgorithm):
        v, typ = d[f.name], str(f.type)
        is_num = isinstance(v, (int, float)) and not isinstance(v, bool)
        if typ == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{where}: {f.name} must be true or false, got {v!r} — fix the value")
        if typ.startswith("float") and not (is_num or (v is None and "None" in typ)):
            raise ConfigError(f"{where}: {f.name} must be a number, got {v!r} — fix the value")
        if typ == "int" and not (is_num and float(v).is_integer()):
            raise ConfigError(f"{where}: {f.name} must be a whole number, got {v!r} — fix the value")
        if typ.startswith("float") and v is not None:
            out[f.name] = float(v)
        elif typ == "int":
            out[f.name] = int(v)
    for key, section in _CONFIG_KEYS.items():
        try:
            check_value(f"{section}.{key}", out[key])
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"config key '{section}.{key}'", f"{where}: {key}")) from None
    if out["decay_steps"] < 1:
        raise ConfigError(f"{where}: decay_steps must be >= 1, got {out['decay_steps']} — fix the value")
    rules = d["token_rules"]
    if not isinstance(rules, (list, tuple)):
        raise ConfigError(f"{where}: token_rules must be a list, got {type(rules).__name__} — fix the value")
    try:
        out["token_rules"] = tuple(r if isinstance(r, TokenRule) else TokenRule(**r) for r in rules)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad token rule ({e}) — see algorithm.token_rules in `a3po config`") from None
    return ResolvedAlgorithm(**out)


# ResolvedAlgorithm fields checked against the config key of the same name in this section.
_CONFIG_KEYS = {
    "w_pos": "algorithm",
    "w_neg": "algorithm",
    "lam": "algorithm",
    "ratio": "algorithm",
    "alpha_pos": "algorithm",
    "alpha_neg": "algorithm",
    "decay": "algorithm",
    "decay_rate": "algorithm",
    "decay_steps": "algorithm",
    "fork_quantile": "algorithm",
    "max_gen_batches": "algorithm",
    "overlong_buffer": "algorithm",
    "clip_ratio_low": "actor",
    "clip_ratio_high": "actor",
    "clip_ratio_c": "actor",
    "loss_agg_mode": "actor",
}


def check_template(template: str) -> None:
    """``data.prompt_template`` must format with exactly one field, ``{prompt}`` (literal braces doubled)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(
            f"config key 'data.prompt_template' is not a valid format string ({e}) — "
            "double literal braces: '{{' and '}}'"
        ) from None
    if "prompt" not in fields:
        raise ConfigError("config key 'data.prompt_template' must contain '{prompt}' — e.g. '{prompt}\\nAnswer:'")
    bad = sorted({f for f in fields if f != "prompt"})
    if bad:
        raise ConfigError(
            f"config key 'data.prompt_template' has unknown field(s) {', '.join('{' + b + '}' for b in bad)} "
            "— only {prompt} is filled in; write literal braces as '{{' and '}}'"
        )


def describe() -> str:
    """Every key with its default and help text (``a3po config``)."""
    lines = []

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                md = f.metadata
                rng = _range(md) if ("min" in md or "max" in md) else ""
                if "item_min" in md:
                    rng = f"items between {md['item_min']} and {md['item_max']}"
                if "choices" in md:
                    rng = "one of " + ", ".join(str(c) for c in md["choices"] if c is not None)
                extra = f" [{rng}]" if rng else ""
                lines.append(f"{prefix}{f.name} = {json.dumps(v)}{extra}\n    {md.get('help', '')}")

    walk(Config())
    return "\n".join(lines)
