"""Build the embedded tiny policy: a char-level tokenizer and a ~1M-parameter Llama, SFT-trained.

Why: every test, the demo and the study run offline on CPU, so the project ships its own small
model in standard Hugging Face format (config.json, model.safetensors, tokenizer.json). It is
trained only far enough that sampled accuracy (temperature 1.0) on the test split sits in the
20-60% band, so both polarities occur in most groups and RL has room to improve.

    a3po build-tiny-model --task countdown   # the default model -> data/tiny-countdown (~8 min, 1 core)
    a3po build-tiny-model --task arith       # the smoke-task model -> data/tiny-model (~2.5 min, 2 cores)

The build is bit-identical for the same seed and torch thread count (each recipe pins its threads).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from engine.model.policy import BUILTIN
from engine.tasks.problems import TASKS, Task, write_jsonl

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-*/=;:,.()[]{}\\^_ \n") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
# Where each task's model ships: the folder behind the task's built-in model id (engine.model.policy.BUILTIN).
MODEL_DIRS = {name: BUILTIN[t.model] for name, t in TASKS.items()}


def build_tokenizer():
    """Char-level fast tokenizer (one token per character) wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )


def build_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


def _sft_batch(tok, problems, rng: random.Random, batch: int):
    rows = [problems[rng.randrange(len(problems))] for _ in range(batch)]
    ids, labels = [], []
    for p in rows:
        a = [tok.bos_token_id] + tok.encode(p.prompt, add_special_tokens=False)
        b = tok.encode(p.solution, add_special_tokens=False) + [tok.eos_token_id]
        ids.append(a + b)
        labels.append([-100] * len(a) + b)
    T = max(len(x) for x in ids)
    inp = torch.full((batch, T), tok.pad_token_id)
    lab = torch.full((batch, T), -100)
    att = torch.zeros((batch, T), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        inp[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return inp, att, lab


# Each task's SFT recipe. The SFT stops early on a longer warm-up + cosine schedule: run to the end
# of its horizon the model is too good (arith ~90% sampled accuracy); stopping at ``steps`` leaves it
# in the band RL needs, where most groups hold both polarities (measured; build_stats.json).
RECIPES = {
    "arith": {"steps": 1050, "schedule_steps": 3000, "lr": 3e-3, "threads": 2},
    "countdown": {"steps": 1625, "schedule_steps": 3000, "lr": 3e-3, "threads": 1},
}
FORK_ENTROPY = 0.672  # nats; a token above it is a "fork" (Wang et al. 2025: ~20% of Qwen3-8B reasoning tokens)


def build_tiny_model(
    out: Path | None = None,
    *,
    task: str = "arith",
    steps: int | None = None,
    schedule_steps: int | None = None,
    batch: int = 64,
    lr: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    eval_every: int = 0,
    write_data: bool = True,
    n_eval: int | None = None,
    log=print,
) -> dict:
    """Write ``task``'s splits and a freshly SFT-trained tiny model to ``out``; returns build stats.

    ``steps`` optimiser steps of a warm-up + cosine schedule whose horizon is ``schedule_steps``
    (defaults: the task's ``RECIPES`` entry). The stats (written to build_stats.json) include the
    rollout statistics of ``rollout_stats`` on the test split at temperature 1."""
    from transformers import LlamaForCausalLM

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    t: Task = TASKS[task]
    recipe = RECIPES[task]
    steps = steps or recipe["steps"]
    schedule_steps = schedule_steps or recipe["schedule_steps"]
    lr = lr or recipe["lr"]
    threads = threads or recipe["threads"]
    from engine.resources import in_checkout

    data_out = t.dir
    if not in_checkout():  # an installed package is read-only: build into the folder the user names
        if out is None:
            from engine.errors import ConfigError

            raise ConfigError(
                "build-tiny-model outside a source checkout needs --out — e.g. --out ./tiny-countdown "
                "(the shipped model in the package is never overwritten)"
            )
        data_out = Path(out) / "data"
    out = Path(out) if out else MODEL_DIRS[task]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, test = t.splits(seed=0)
    if write_data:
        data_out.mkdir(parents=True, exist_ok=True)
        write_jsonl(train, data_out / "train.jsonl")
        write_jsonl(test, data_out / "test.jsonl")
    tok = build_tokenizer()
    model = LlamaForCausalLM(build_config(len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    horizon = max(steps, schedule_steps)
    warm = max(1, horizon // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / horizon)))
    )
    rng = random.Random(seed)
    t0 = time.time()
    history = []
    model.train()
    for step in range(1, steps + 1):
        inp, att, lab = _sft_batch(tok, train, rng, batch)
        loss = model(input_ids=inp, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"sft step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if eval_every and step % eval_every == 0:
            st = rollout_stats(model, tok, test[:200], t.verifier, seed=seed)
            history.append({"step": step, **st})
            log(f"  step {step}: {st}")
            model.train()
    seconds = round(time.time() - t0, 1)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    st = rollout_stats(model, tok, test[:n_eval] if n_eval else test, t.verifier, seed=seed)
    stats = {
        "task": task,
        "sft_steps": steps,
        "schedule_steps": horizon,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "threads": threads,
        "seconds": seconds,
        "test_sampled_accuracy_t1": st["accuracy"],
        "rollout_stats_t1": st,
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    (out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"wrote {out} ({stats['params']} params); on fresh T=1 rollouts of the test split: {st}")
    return stats


@torch.no_grad()
def rollout_stats(
    model,
    tok,
    problems,
    verifier: str = "math",
    *,
    group: int = 8,
    seed: int = 0,
    batch: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
) -> dict:
    """Polarity statistics of fresh rollouts: ``group`` samples per problem at ``temperature``.

    Returns accuracy (share of correct samples), mixed_groups (share of problems whose group holds
    both polarities), all_wrong / all_correct group shares, mean response length (tokens incl. EOS),
    mean token entropy (nats, of the sampling distribution) and fork_frac (share of response tokens
    with entropy > ``FORK_ENTROPY``). These are the numbers that say whether a task gives
    token-level shaping something to act on."""
    from engine.tasks.reward import get_verifier

    verify = get_verifier(verifier)
    model.eval()
    n_ok = n_tok = n_fork = 0
    ent_sum = 0.0
    mixed = all_wrong = all_right = 0
    with torch.random.fork_rng():  # sampling must not move the global RNG a build or a run relies on
        torch.manual_seed(seed)
        for i in range(0, len(problems), batch):
            chunk = problems[i : i + batch]
            enc = [
                [tok.bos_token_id] + tok.encode(p.prompt, add_special_tokens=False) for p in chunk for _ in range(group)
            ]
            T = max(map(len, enc))
            ids = torch.tensor([[tok.pad_token_id] * (T - len(e)) + e for e in enc])
            att = (torch.arange(T).expand(len(enc), T) >= torch.tensor([T - len(e) for e in enc]).unsqueeze(1)).long()
            out = model.generate(
                input_ids=ids,
                attention_mask=att,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            resp = out.sequences[:, T:]
            logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # (B, L, V): scores are logits / T
            ent = -(logp.exp() * logp).nan_to_num().sum(-1)
            is_eos = resp == tok.eos_token_id
            valid = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # tokens up to and including the first EOS
            ok = []
            for b in range(resp.shape[0]):
                row = resp[b][valid[b] & ~is_eos[b]].tolist()
                ok.append(bool(verify(tok.decode(row, skip_special_tokens=True), chunk[b // group])))
            n_ok += sum(ok)
            n_tok += int(valid.sum())
            ent_sum += float(ent[valid].sum())
            n_fork += int((ent[valid] > FORK_ENTROPY).sum())
            for g in range(len(chunk)):
                c = sum(ok[g * group : (g + 1) * group])
                mixed += 0 < c < group
                all_wrong += c == 0
                all_right += c == group
    n_samples = len(problems) * group
    return {
        "accuracy": round(n_ok / n_samples, 4),
        "mixed_groups": round(mixed / len(problems), 4),
        "all_wrong_groups": round(all_wrong / len(problems), 4),
        "all_correct_groups": round(all_right / len(problems), 4),
        "length": round(n_tok / n_samples, 2),
        "entropy": round(ent_sum / max(1, n_tok), 4),
        "fork_frac": round(n_fork / max(1, n_tok), 4),
        "n_prompts": len(problems),
        "group": group,
    }
