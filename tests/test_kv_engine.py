"""The kv rollout engine against the HF reference and the trainer's own recompute.

On the shipped model (builtin:tiny-countdown) with real Countdown prompts of different lengths:
the cached logits equal a plain full forward, greedy outputs equal ``HFBackend``'s token for token
(with our preallocated cache and with the model's own DynamicCache), sampling follows transformers'
temperature / top-k / top-p rules (exact warper agreement, and a chi-square test on 20k samples of one
step, and a two-sample chi-square against ``HFBackend``'s own draws of the first two tokens), and
the recorded log-probs / entropies equal ``response_logits`` + ``token_logprobs`` /
``token_entropy`` within 1e-4.
"""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import engine.rollout.kv as ke
from engine.model.ops import token_entropy, token_logprobs
from engine.model.policy import load_policy
from engine.rollout.base import SamplingParams, cut_at_eos, left_pad, position_ids
from engine.rollout.hf import HFBackend
from engine.rollout.kv import KVEngine, sample_tokens, warp_logits
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts
from engine.train.trainer import response_logits


@pytest.fixture(scope="module")
def policy():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    yield model, tok
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompts(policy):
    _, tok = policy
    ps = encode_prompts(tok, load_problems("builtin:countdown", "train")[:12])
    assert len({len(p) for p in ps}) >= 3  # really different lengths, so left padding is exercised
    return ps


@pytest.fixture(params=["slot", "slot-model-forward", "dynamic"])
def cache_kind(request, monkeypatch):
    """Run a test with each decode path: our preallocated cache stepped by ``fast_forward.Decoder``, the
    same cache stepped by the model's own forward, and the model's DynamicCache fallback."""
    if request.param == "dynamic":
        monkeypatch.setattr(ke, "_plain_attention", lambda config: False)
    if request.param == "slot-model-forward":
        monkeypatch.setattr(ke, "unsupported_reason", lambda model: "forced off")
    return request.param


def p(**kw):
    return SamplingParams(**{"n": 1, "temperature": 0.0, "max_new_tokens": 40, "seed": 0, **kw})


# ------------------------------------------------------------------ logits and greedy agreement
def test_cached_logits_equal_full_forward(policy, prompts, cache_kind):
    model, tok = policy
    eng = KVEngine(model, tok)
    eng.trace = []
    ro = eng.generate(prompts, p(n=2, temperature=1.0, seed=5))
    lengths = ro.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows retire at different steps: the compaction is exercised
    with torch.no_grad():
        full = response_logits(model, ro, 1.0)  # (B, T, V): position t predicts response token t
    assert len(eng.trace) == ro.response_ids.shape[1]
    for t, (rows, logits) in enumerate(eng.trace):
        assert sorted(rows.tolist()) == [b for b in range(ro.response_ids.shape[0]) if lengths[b] > t]
        torch.testing.assert_close(logits, full[rows, t], atol=1e-4, rtol=1e-4)


def test_greedy_equals_hf_backend(policy, prompts, cache_kind):
    model, tok = policy
    a = HFBackend(model, tok).generate(prompts, p(n=2))  # n=2: the shared prefill is repeated into both rows
    b = KVEngine(model, tok).generate(prompts, p(n=2))
    assert b.response_ids.shape[0] == 2 * len(prompts)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    lengths = b.response_mask.sum(1)
    assert lengths.min() < lengths.max()


def test_greedy_budget_one_equals_hf(policy, prompts):
    model, tok = policy
    a = HFBackend(model, tok).generate(prompts, p(max_new_tokens=1))
    b = KVEngine(model, tok).generate(prompts, p(max_new_tokens=1))
    assert b.response_ids.shape == (len(prompts), 1)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.truncated, b.truncated)
    assert b.truncated.tolist() == [t != tok.eos_token_id for t in b.response_ids[:, 0].tolist()]


class _EosAfter:
    """Hooks: make EOS overwhelmingly likely after the given input token (a model that stops).

    The embedding hook sees each forward's input ids (the model's own forward and the fast decoder
    both embed through ``embed_tokens``); the LM-head hook raises EOS on the rows whose last input
    was the trigger."""

    def __init__(self, model, trigger, eos):
        self.trigger, self.eos, self.last = trigger, eos, None
        self.handles = [
            model.model.embed_tokens.register_forward_hook(self.saw),
            model.lm_head.register_forward_hook(self.bias),
        ]

    def saw(self, module, args, out):
        ids = args[0]
        self.last = ids[:, -1] if ids.dim() == 2 else ids

    def bias(self, module, args, out):
        hit = 100.0 * (self.last == self.trigger).float()
        if out.dim() == 3:
            out[:, -1, self.eos] += hit
        else:
            out[:, self.eos] += hit
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def test_length_one_responses_mixed_with_long_ones(policy, prompts, cache_kind):
    model, tok = policy
    trigger = prompts[0][-1]
    mixed = [pr[:-1] for pr in prompts[:4]] + prompts[:4]  # the first four do not end with the trigger token
    assert all(pr[-1] != trigger for pr in mixed[:4])
    hook = _EosAfter(model, trigger, tok.eos_token_id)
    try:
        a = HFBackend(model, tok).generate(mixed, p())
        b = KVEngine(model, tok).generate(mixed, p())
    finally:
        hook.remove()
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.truncated, b.truncated)
    assert b.response_mask[4:].sum(1).tolist() == [1, 1, 1, 1]
    assert b.response_ids[4:, 0].tolist() == [tok.eos_token_id] * 4
    assert (b.response_mask[:4].sum(1) > 1).all()


def test_all_rows_end_at_step_one(policy, prompts, cache_kind):
    model, tok = policy
    hook = _EosAfter(model, prompts[0][-1], tok.eos_token_id)
    try:
        same_end = [pr for pr in prompts if pr[-1] == prompts[0][-1]]
        ro = KVEngine(model, tok).generate(same_end, p(n=3, temperature=1.0, seed=1))
    finally:
        hook.remove()
    B = 3 * len(same_end)
    assert ro.response_ids.tolist() == [[tok.eos_token_id]] * B
    assert ro.response_mask.tolist() == [[1]] * B and not ro.truncated.any()
    assert ro.logprobs.shape == ro.entropy.shape == (B, 1)
    # EOS got +100 on its logit: probability ~1, so log-prob ~0 and entropy ~0
    assert (ro.logprobs > -1e-4).all() and (ro.logprobs <= 0).all() and (ro.entropy < 1e-3).all()


# ------------------------------------------------------------------ recorded log-probs and entropies
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9), (0.0, 0, 1.0), (1.3, 0, 0.8)])
def test_recorded_logprobs_equal_trainer_recompute(policy, prompts, temperature, top_k, top_p):
    model, tok = policy
    params = p(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=32, seed=7)
    ro = KVEngine(model, tok).generate(prompts, params)
    with torch.no_grad():
        logits = response_logits(model, ro, temperature)
        lp = token_logprobs(logits, ro.response_ids)
        ent = token_entropy(logits)
    m = ro.response_mask.bool()
    assert ro.logprobs.shape == ro.entropy.shape == ro.response_ids.shape
    assert (ro.logprobs[m] - lp[m]).abs().max() < 1e-4
    assert (ro.entropy[m] - ent[m]).abs().max() < 1e-4
    assert (ro.logprobs[~m] == 0).all() and (ro.entropy[~m] == 0).all()
    if temperature == 0:
        assert (ro.logprobs[m] <= 0).all() and (ro.entropy[m] > 0).all()


# ------------------------------------------------------------------ layout, EOS and seeds
def test_sampled_layout_follows_cut_at_eos(policy, prompts, cache_kind):
    model, tok = policy
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ro = KVEngine(model, tok).generate(prompts, p(n=4, temperature=1.0, max_new_tokens=36, seed=3))
    ids, mask, trunc = cut_at_eos(ro.response_ids, eos, pad)  # already cut: cutting again changes nothing
    assert (
        torch.equal(ids, ro.response_ids) and torch.equal(mask, ro.response_mask) and torch.equal(trunc, ro.truncated)
    )
    lengths = ro.response_mask.sum(1)
    assert ro.response_ids.shape[1] == int(lengths.max())
    for b in range(ro.response_ids.shape[0]):
        row, L = ro.response_ids[b].tolist(), int(lengths[b])
        assert ro.response_mask[b].tolist() == [1] * L + [0] * (len(row) - L)  # a prefix
        assert row[L:] == [pad] * (len(row) - L)
        assert eos not in row[: L - 1]  # nothing after the first EOS is kept
        if ro.truncated[b]:
            assert L == 36 and row[L - 1] != eos
        else:
            assert row[L - 1] == eos
    assert ro.truncated.any() and not ro.truncated.all()  # both kinds present with a 36-token budget


def test_seeded_and_independent_of_global_rng(policy, prompts):
    model, tok = policy
    eng = KVEngine(model, tok)
    torch.manual_seed(1)
    a = eng.generate(prompts, p(n=2, temperature=1.0, seed=11))
    torch.manual_seed(2)
    b = eng.generate(prompts, p(n=2, temperature=1.0, seed=11))
    c = eng.generate(prompts, p(n=2, temperature=1.0, seed=12))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_cache_memory_is_reused_between_generates(policy, prompts):
    """The second generate carves its cache out of the memory the first one asked for (no fresh pages),
    and what it samples does not depend on it: the same as a fresh engine's, whatever the buffers held."""
    model, tok = policy
    eng = KVEngine(model, tok)
    first = eng.generate(prompts, p(n=3, temperature=1.0, seed=5))
    assert eng.arena.flat is None and eng.arena.need > 0  # the first generate sizes it
    eng.generate(prompts[:5], p(n=2, temperature=1.0, seed=6))  # a smaller batch in between
    flat = eng.arena.flat
    assert flat is not None and flat.numel() >= eng.arena.need
    flat.fill_(float("nan"))  # stale contents must never be read
    again = eng.generate(prompts, p(n=3, temperature=1.0, seed=5))
    assert eng.arena.flat is flat and eng.arena.used > 0  # the same memory, not a new allocation
    for f in ("prompt_ids", "response_ids", "response_mask", "truncated", "logprobs", "entropy"):
        assert torch.equal(getattr(first, f), getattr(again, f)), f
    eng.close()
    assert eng.arena.flat is None  # closing the engine frees it


def test_arena_hands_out_aligned_views_and_falls_back():
    arena = ke._Arena()
    like = torch.empty(0)
    a = arena.take((3, 5), like)  # nothing kept yet: its own allocation
    assert a.shape == (3, 5) and arena.need == 16
    arena.take((2, 2, 3), like)
    arena.begin()
    assert arena.flat.numel() == 32 and arena.used == 0
    x, y = arena.take((3, 5), like), arena.take((2, 2, 3), like)
    assert x.data_ptr() == arena.flat.data_ptr() and y.data_ptr() == arena.flat.data_ptr() + 16 * 4
    z = arena.take((4,), like)  # does not fit: its own memory, and the next generate covers it
    assert z.untyped_storage().data_ptr() != arena.flat.untyped_storage().data_ptr()
    arena.begin()
    assert arena.flat.numel() == 48
    w = arena.take((4,), torch.empty(0, dtype=torch.float64))  # another dtype: not from the float32 buffer
    assert w.dtype == torch.float64 and arena.need == 16
    arena.begin()
    assert arena.flat.dtype == torch.float64 and arena.flat.numel() == 16


def test_restores_train_mode(policy, prompts):
    model, tok = policy
    model.train()
    KVEngine(model, tok).generate(prompts[:2], p(max_new_tokens=3))
    assert model.training
    model.eval()
    KVEngine(model, tok).generate(prompts[:2], p(max_new_tokens=3))
    assert not model.training


# ------------------------------------------------------------------ sampling semantics
def hf_warp(scores, temperature, top_k, top_p):
    for w in (
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    ):
        scores = w(None, scores)
    return scores


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 3, 1.0), (0.5, 0, 0.6), (2.0, 5, 0.3), (1.0, 0, 0.01), (0.8, 100, 0.95), (1.0, 1, 1.0)],
)
def test_warp_equals_transformers_warpers_with_ties(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g)
    x[:, 1] = x[:, 0]  # ties with the best, and a tied block in the middle
    x[:, 5:9] = x[:, 4:5]
    x[:8] = torch.tensor([3.0, 3.0, 3.0, 1.0] + [0.0] * 16)  # top_k=1 or 3 must keep all three tied 3.0s
    ours, ref = warp_logits(x, temperature, top_k, top_p), hf_warp(x.clone(), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], atol=1e-6, rtol=0)
    assert (~torch.isinf(ours)).sum(1).min() >= 1  # always at least one token left
    if top_k in (1, 3) and top_p == 1.0:
        assert (~torch.isinf(ours[:8])).sum(1).tolist() == [3] * 8


def test_sample_tokens_greedy_is_argmax():
    x = torch.tensor([[0.1, 2.0, -1.0], [5.0, 0.0, 4.9]])
    tok, lp, ent = sample_tokens(x, p(temperature=0.0), None)
    assert tok.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(x, -1)[[0, 1], [1, 0]])
    torch.testing.assert_close(ent, token_entropy(x))


def chi2_pvalue(counts, probs, n):
    """Pearson chi-square p-value; cells with expected count < 5 are pooled into one."""
    exp = probs * n
    big = exp >= 5
    obs_c = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    if exp_c[-1] < 5:  # pooled rest still too small: merge it into the smallest big cell
        i = int(exp_c[:-1].argmin())
        obs_c[i] += obs_c[-1]
        exp_c[i] += exp_c[-1]
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    stat = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    df = obs_c.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def test_sampled_distribution_passes_chi_square(policy, prompts):
    model, tok = policy
    # At this prefix the model has three likely digits and a long tail; a hot temperature spreads the tail
    # so that top-k (6) and top-p (0.9) each cut something the other would keep.
    T, k, top_p = 3.0, 6, 0.9
    prompt = prompts[0]
    ids, mask = left_pad([prompt], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[0, -1].float()

    def dist(temperature, top_k, p_):
        return hf_warp(logits[None].clone(), temperature, top_k, p_).softmax(-1)[0].double()

    probs = dist(T, k, top_p)
    support = int((probs > 0).sum())
    assert 3 <= support < int((dist(T, k, 1.0) > 0).sum()) and support < int((dist(T, 0, top_p) > 0).sum())
    eng = KVEngine(model, tok)
    counts = torch.zeros_like(probs)
    n = 0
    for seed in range(4):  # 4 x 5000 identical prompts, one step each
        ro = eng.generate(
            [prompt], SamplingParams(n=5000, temperature=T, top_k=k, top_p=top_p, max_new_tokens=1, seed=seed)
        )
        counts += torch.bincount(ro.response_ids[:, 0], minlength=probs.numel()).double()
        n += 5000
    assert counts[probs == 0].sum() == 0  # nothing outside the kept set is ever drawn
    assert chi2_pvalue(counts, probs, n) > 1e-3
    # the test has power: top-k alone, top-p alone, or another temperature is rejected
    for wrong in (dist(T, k, 1.0), dist(T, 0, top_p), dist(2.0, k, top_p), (logits / T).softmax(-1).double()):
        assert chi2_pvalue(counts, wrong, n) < 1e-6


def two_sample_pvalue(a, b):
    """Chi-square homogeneity p-value of two count vectors; cells with < 10 draws in all are pooled."""
    a, b = a.double(), b.double()
    big = (a + b) >= 10
    a = torch.cat([a[big], a[~big].sum().reshape(1)])
    b = torch.cat([b[big], b[~big].sum().reshape(1)])
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    ea, eb = (a + b) * na / (na + nb), (a + b) * nb / (na + nb)
    stat = float(((a - ea) ** 2 / ea).sum() + ((b - eb) ** 2 / eb).sum())
    df = a.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def test_sampled_frequencies_match_hf_backend(policy, prompts):
    """The kv engine and HFBackend draw the first two tokens (the second through the cache) equally often:
    a two-sample chi-square on 8,000 draws each, top-k and top-p both active."""
    model, tok = policy
    V = model.config.vocab_size
    T, k, top_p, n = 3.0, 6, 0.9, 4000

    def pairs(backend, temperature, seeds=(0, 1)):
        counts = torch.zeros(V * V)
        for seed in seeds:
            ro = backend.generate(
                [prompts[0]],
                SamplingParams(n=n, temperature=temperature, top_k=k, top_p=top_p, max_new_tokens=2, seed=seed),
            )
            ids = torch.nn.functional.pad(ro.response_ids, (0, 2 - ro.response_ids.shape[1]), value=tok.pad_token_id)
            counts += torch.bincount(ids[:, 0] * V + ids[:, 1], minlength=V * V).float()  # pad after an EOS
        return counts

    # other seeds than HF's: with the same seed both draw from the same RNG stream and agree draw for draw
    ours, hf = pairs(KVEngine(model, tok), T, seeds=(10, 11)), pairs(HFBackend(model, tok), T)
    assert int((ours > 0).sum()) >= 5  # a real spread of pairs, not one dominant one
    assert two_sample_pvalue(ours, hf) > 1e-3
    # the comparison has power: HF at another temperature is told apart
    assert two_sample_pvalue(ours, pairs(HFBackend(model, tok), 1.5)) < 1e-6
