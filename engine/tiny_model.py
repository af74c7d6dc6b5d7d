"""Build the embedded tiny policy: a char-level tokenizer and a ~1M-parameter Llama, SFT-trained.

Why: every test, the demo and the study run offline on CPU, so the project ships its own small
model in standard Hugging Face format (config.json, model.safetensors, tokenizer.json). It is
trained only far enough that sampled accuracy (temperature 1.0) on the test split sits in the
20-60% band, so both polarities occur in most groups and RL has room to improve.

    a3po build-tiny-model --out data/tiny-model      # deterministic given --seed and threads

The build is bit-identical for the same seed and torch thread count (we pin threads to 2).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from engine.tasks import ARITH_DIR, DATA_DIR, make_arith_splits, write_jsonl

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-*/=;:,.()[]{}\\^_ \n") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
DEFAULT_OUT = DATA_DIR / "tiny-model"


def build_tokenizer():
    """Char-level fast tokenizer (one token per character) wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", model_max_length=256,
    )


def build_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rms_norm_eps=1e-5, rope_theta=10000.0,
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


# The SFT stops early on a longer cosine schedule: at SCHEDULE_STEPS=3000 the model reaches ~90%
# sampled accuracy; stopping at STOP_STEP leaves it in the 20-60% band RL needs (measured; README).
SCHEDULE_STEPS = 3000
STOP_STEP = 1050


def build_tiny_model(out: Path = DEFAULT_OUT, *, steps: int = STOP_STEP, schedule_steps: int = SCHEDULE_STEPS, batch: int = 64,
                     lr: float = 3e-3, seed: int = 0, threads: int = 2, eval_every: int = 0, write_data: bool = True,
                     n_eval: int | None = None, log=print) -> dict:
    """Write the task splits and a freshly SFT-trained tiny model to ``out``; returns build stats.

    ``steps`` optimiser steps of a warm-up + cosine schedule whose horizon is ``schedule_steps``."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, test = make_arith_splits(seed=0)
    if write_data:
        write_jsonl(train, ARITH_DIR / "train.jsonl")
        write_jsonl(test, ARITH_DIR / "test.jsonl")
    tok = build_tokenizer()
    model = LlamaForCausalLM(build_config(len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    horizon = max(steps, schedule_steps)
    warm = max(1, horizon // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / horizon))))
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
            acc = sampled_accuracy(model, tok, test[:200], seed=seed)
            history.append((step, acc))
            log(f"  step {step}: sampled accuracy {acc:.3f}")
            model.train()
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    acc = sampled_accuracy(model, tok, test[:n_eval] if n_eval else test, seed=seed)
    stats = {"sft_steps": steps, "schedule_steps": horizon, "batch": batch, "lr": lr, "seed": seed, "threads": threads,
             "seconds": round(time.time() - t0, 1), "test_sampled_accuracy_t1": round(acc, 4),
             "params": sum(p.numel() for p in model.parameters()), "history": history}
    (out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"wrote {out} ({stats['params']} params); sampled accuracy at T=1 on test: {acc:.3f}")
    return stats


@torch.no_grad()
def sampled_accuracy(model, tok, problems, *, seed: int = 0, batch: int = 100, max_new_tokens: int = 48) -> float:
    """Share of problems answered correctly by one temperature-1.0 sample each."""
    from engine.reward import is_correct

    model.eval()
    torch.manual_seed(seed)
    correct = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        enc = [[tok.bos_token_id] + tok.encode(p.prompt, add_special_tokens=False) for p in chunk]
        T = max(map(len, enc))
        ids = torch.tensor([[tok.pad_token_id] * (T - len(e)) + e for e in enc])
        att = (torch.arange(T).expand(len(enc), T) >= torch.tensor([T - len(e) for e in enc]).unsqueeze(1)).long()
        out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for p, row in zip(chunk, out[:, T:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            correct += is_correct(tok.decode(row, skip_special_tokens=True), p.answer)
    return correct / max(1, len(problems))
