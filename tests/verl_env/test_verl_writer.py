"""verl_main's store writer on batches produced by verl 0.9.1's own code, for both trainers.

Legacy (``RayPPOTrainer.fit``): the old-log-prob result is popped and unioned as fit does, then
verl's ``compute_advantage`` runs, then the writing subclass's ``_update_actor`` gets the batch.
v1 (``PPOTrainer``): rows sit in a stand-in TransferQueue (the same jagged TensorDict the agent loop
puts there, via verl's ``list_of_dict_to_tensordict``), verl's real ``_compute_advantage`` reads
them and writes the advantages back, and the writing subclass's ``step`` reads the step back.
No GPU, no Ray: the worker-group calls (``_compute_old_log_prob``'s forward, ``update_actor``) are
stand-ins that return what verl's would.
"""

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")

import numpy as np  # noqa: E402
from conftest import ROOT  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from verl import DataProto  # noqa: E402

from engine.config import config_from_dict, resolved_from_dict  # noqa: E402
from engine.integrations import verl_main  # noqa: E402
from engine.shaping.algorithms import ResolvedAlgorithm, shape_tokens  # noqa: E402
from engine.shaping.replay import load_step  # noqa: E402
from engine.store.store import Store  # noqa: E402

TOKENIZER = ROOT / "data" / "tiny-model"
# 2 prompts x 2 responses; row 0 right, row 1 wrong (group a: mixed), rows 2-3 wrong (group b: all wrong)
PROMPTS = ["12+3=", "4+4="]
RESPONSES = ["15", "16 7", "9", "1"]
SCORES = [1.0, 0.0, 0.0, 0.0]
UIDS = ["a", "a", "b", "b"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def _config(tmp_path, *extra):
    return verl_main.prepare(
        [
            f"actor_rollout_ref.model.path={TOKENIZER}",
            "algorithm.adv_estimator=grpo",
            "actor_rollout_ref.rollout.n=2",
            "data.train_batch_size=2",
            "trainer.total_training_steps=10",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}",
            "a3po.algorithm.alpha_pos=3",
            "a3po.algorithm.alpha_neg=2",
            "a3po.algorithm.ratio=0.5",
            f"a3po.store={tmp_path / 'runs'}",
            "a3po.run_name=verl-run",
            *extra,
        ]
    )


def _ids(tok, texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _old_and_entropy(B, T):
    g = torch.Generator().manual_seed(0)
    return -torch.rand(B, T, generator=g) * 2, torch.rand(B, T, generator=g)


def _check_rows(store: Store, tok, run_id: str, step: int, old, ent, resolved: ResolvedAlgorithm):
    """The stored step against verl's advantages and the engine's shaping at step - 1."""
    ro = store.query("select * from rollouts where step = ? order by rollout_idx", [step], run_ids=[run_id])
    tk = store.query("select * from tokens where step = ? order by rollout_idx, position", [step], run_ids=[run_id])
    resp = _ids(tok, RESPONSES)
    old, ent = old[:4], (ent[:4] if ent is not None else None)  # v1's fifth row is padding
    assert len(ro) == 4 and len(tk) == sum(map(len, resp))
    assert list(ro.response) == RESPONSES and list(ro.prompt) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert list(ro.reward) == SCORES and list(ro.correct) == [True, False, False, False]
    assert list(ro.polarity) == [1, -1, 0, 0] and list(ro.group_idx) == [0, 0, 1, 1]
    # verl's GRPO on (1, 0): +-(0.5 / std) with the unbiased std 0.7071 -> +-0.7071; all-wrong group: 0
    assert ro.adv_raw.tolist() == pytest.approx([0.70710, -0.70710, 0.0, 0.0], abs=1e-4)
    T = max(map(len, resp))
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in resp])
    adv = torch.tensor(ro.adv_raw.tolist()).unsqueeze(-1) * mask
    ref = shape_tokens(resolved, adv, torch.tensor([1, -1, 0, 0]), mask, logprobs=old[:, :T], step=step - 1)
    m = mask.bool()
    assert np.allclose(tk.adv_raw, adv[m].numpy(), atol=1e-5)
    assert np.allclose(tk.adv_shaped, ref.adv[m].numpy(), atol=1e-5)
    assert (tk.adv_shaped != tk.adv_raw).any() and tk.is_key.any()
    assert np.allclose(tk.logprob, old[:, :T][m].numpy(), atol=1e-6)
    if ent is None:
        assert tk.entropy.isna().all()
    else:
        assert np.allclose(tk.entropy, ent[:, :T][m].numpy(), atol=1e-6)
    assert "".join(tk[tk.rollout_idx == 1].token_text) == RESPONSES[1]
    st = store.query("select * from steps where step = ?", [step], run_ids=[run_id])
    assert st.alpha_pos[0] == pytest.approx(ref.alpha_pos) and st.acc[0] == 0.25


# ---------------------------------------------------------------- legacy trainer
def _legacy_rollout(tok) -> DataProto:
    """The batch fit holds after generation + reward: left-padded prompts, right-padded responses."""
    p = _ids(tok, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2)
    r = _ids(tok, RESPONSES)
    P, T = max(map(len, p)), max(map(len, r))
    prompts = torch.tensor([[0] * (P - len(x)) + x for x in p])
    responses = torch.tensor([x + [0] * (T - len(x)) for x in r])
    pmask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in p])
    rmask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in r])
    scores = torch.zeros(4, T)
    for i, x in enumerate(r):
        scores[i, len(x) - 1] = SCORES[i]
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": torch.cat([pmask, rmask], 1),
            "response_mask": rmask,
            "token_level_scores": scores,
        },
        non_tensors={
            "uid": np.array(UIDS, dtype=object),
            "reward_model": np.array([{"ground_truth": "15"}] * 2 + [{"ground_truth": "8"}] * 2, dtype=object),
        },
    )


def _legacy_trainer(cfg, tok, old, ent):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    class WorkerStandIns(RayPPOTrainer):
        """RayPPOTrainer with its two worker-group calls answered locally."""

        def __init__(self):  # verl's __init__ builds worker groups; the methods under test need none
            self.config, self.tokenizer, self.updated = cfg, tok, []

        def _compute_old_log_prob(self, batch):
            T = batch.batch["responses"].shape[1]
            return DataProto.from_dict({"old_log_probs": old[:, :T], "entropys": ent[:, :T]}), 0.0

        def _update_actor(self, batch):
            self.updated.append(batch)
            return DataProto(meta_info={"metrics": {}})

    return verl_main.legacy_trainer(WorkerStandIns)()


def _legacy_step(trainer, tok, step: int):
    """RayPPOTrainer.fit's order from the old-log-prob pass to the actor update (verl 0.9.1)."""
    from verl.trainer.ppo.ray_trainer import compute_advantage

    trainer.global_steps = step
    batch = _legacy_rollout(tok)
    old_log_prob, _ = trainer._compute_old_log_prob(batch)
    old_log_prob.batch.pop("entropys")
    batch = batch.union(old_log_prob)
    batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
    batch = compute_advantage(batch, adv_estimator="grpo", num_repeat=2, config=trainer.config.algorithm)
    trainer._update_actor(batch)
    return batch


def test_legacy_trainer_writes_each_step(tmp_path, tok):
    cfg = _config(tmp_path, "trainer.use_v1=false")
    old, ent = _old_and_entropy(4, 8)
    t = _legacy_trainer(cfg, tok, old, ent)
    batch = _legacy_step(t, tok, 1)
    assert "entropys" not in batch.batch.keys()  # fit drops them; the writer kept its own copy
    assert t.updated and t.updated[0] is batch  # verl's update got the batch unchanged
    _legacy_step(t, tok, 2)
    store = Store(tmp_path / "runs")
    rid = t._a3po_w.run.run_id
    resolved = resolved_from_dict(store.read_run(rid)["resolved"])
    assert (resolved.alpha_pos, resolved.alpha_neg, resolved.decay_steps) == (3.0, 2.0, 10)
    for step in (1, 2):
        _check_rows(store, tok, rid, step, old, ent, resolved)
    meta = store.read_run(rid)
    assert meta["last_step"] == 2 and meta["status"] == "running" and meta["name"] == "verl-run"
    config_from_dict(meta["config"])  # the app rebuilds the run's config like this
    assert load_step(store, rid, 2).mask.shape == (4, max(map(len, _ids(tok, RESPONSES))))


def test_legacy_seam_is_where_the_writer_expects_it():
    """verl 0.9.1's fit: entropys popped, then compute_advantage, then _update_actor(batch)."""
    import inspect

    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    src = inspect.getsource(RayPPOTrainer.fit)
    order = [
        src.index("self._compute_old_log_prob(batch)"),
        src.index('old_log_prob.batch.pop("entropys")'),
        src.index("batch = compute_advantage("),
        src.index("self._update_actor(batch)"),
    ]
    assert order == sorted(order)
    import verl.trainer.main_ppo_v0 as v0

    assert "RayPPOTrainer(" in inspect.getsource(v0.TaskRunner.__ray_metadata__.modified_class.run)


def test_resume_continues_the_run_with_the_decay_step(tmp_path, tok):
    """A fresh TaskRunner after verl resumed from global_step_2: step 3 lands in the same run."""
    cfg = _config(tmp_path, "trainer.use_v1=false", "a3po.algorithm.decay=linear")
    old, ent = _old_and_entropy(4, 8)
    t = _legacy_trainer(cfg, tok, old, ent)
    for step in (1, 2, 3):
        _legacy_step(t, tok, step)
    rid = t._a3po_w.run.run_id
    t2 = _legacy_trainer(cfg, tok, old, ent)  # the process died after step 3; checkpoint at 2
    _legacy_step(t2, tok, 3)
    assert t2._a3po_w.run.run_id == rid
    store = Store(tmp_path / "runs")
    steps = store.query("select step, alpha_pos from steps order by step", run_ids=[rid])
    assert list(steps.step) == [1, 2, 3]
    # alpha(step - 1) over S = 10: 3, then one decay increment per finished step
    from engine.shaping.advantage import decay_alpha

    r = resolved_from_dict(store.read_run(rid)["resolved"])
    assert steps.alpha_pos.tolist() == pytest.approx(
        [decay_alpha(3.0, s - 1, 10, "linear", r.decay_rate) for s in (1, 2, 3)]
    )
    assert steps.alpha_pos[0] > steps.alpha_pos[2]


# ---------------------------------------------------------------- v1 trainer
class FakeTQ:
    """The two TransferQueue calls the v1 trainer makes, on one in-memory jagged TensorDict."""

    def __init__(self, td, keys):
        self.td, self.keys = td, keys

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        assert list(keys) == self.keys and partition_id == "train"
        return self.td.select(*[f for f in select_fields if f in self.td.keys()])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from transfer_queue import KVBatchMeta

        assert list(keys) == self.keys
        for k in fields.keys():
            self.td.set(k, fields[k])
        return KVBatchMeta(keys=list(keys), tags=self.tags, partition_id=partition_id)


def _v1_queue(tok, old, ent):
    """What the agent loop puts per trajectory, plus _compute_old_log_prob's old_log_probs/entropy;
    a fifth row is a padding row (as _balance_batch adds)."""
    from transfer_queue import KVBatchMeta
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    prompts = _ids(tok, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[1]])
    resp = _ids(tok, RESPONSES + ["9"])
    rows = []
    for i, (p, r) in enumerate(zip(prompts, resp)):
        score = torch.zeros(len(r))
        score[-1] = (SCORES + [0.0])[i]
        rows.append(
            {
                "prompts": torch.tensor(p),
                "responses": torch.tensor(r),
                "response_mask": torch.ones(len(r), dtype=torch.int64),
                "rm_scores": score,
                "old_log_probs": old[i, : len(r)],
                "entropy": ent[i, : len(r)],
                "uid": (UIDS + ["pad"])[i],
            }
        )
    keys = [f"{u}_{i}_0" for i, u in enumerate(UIDS + ["pad"])]
    tags = [{"is_padding": False}] * 4 + [{"is_padding": True}]
    q = FakeTQ(list_of_dict_to_tensordict(rows), keys)
    q.tags = tags
    return q, KVBatchMeta(keys=keys, tags=tags, partition_id="train")


def test_v1_trainer_writes_each_step(tmp_path, tok, monkeypatch):
    pytest.importorskip("transfer_queue")  # verl's v1 trainer imports it
    import transfer_queue
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    cfg = _config(tmp_path)
    assert cfg.trainer.use_v1  # verl 0.9.1's default
    old, ent = _old_and_entropy(5, 8)
    q, meta = _v1_queue(tok, old, ent)
    monkeypatch.setattr(transfer_queue, "kv_batch_get", q.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", q.kv_batch_put)

    class UpToAdvantage(get_trainer_cls(cfg.trainer.v1.trainer_mode)):
        """The sync trainer whose step() runs only verl's own advantage stage on the queued rows."""

        def __init__(self):
            self.config, self.tokenizer = cfg, tok

        def step(self, metrics, timing_raw):
            return self._compute_advantage(meta, metrics)

    t = verl_main.v1_trainer(UpToAdvantage)()
    for step in (1, 2):
        t.global_steps = step
        assert t.step({}, {}).keys == meta.keys
    assert "advantages" in q.td.keys()  # written back by verl's _compute_advantage
    store = Store(tmp_path / "runs")
    rid = t._a3po_w.run.run_id
    resolved = resolved_from_dict(store.read_run(rid)["resolved"])
    for step in (1, 2):
        _check_rows(store, tok, rid, step, old, ent, resolved)  # 4 rows: the padding row is not stored


def test_v1_seam_is_where_the_writer_expects_it():
    pytest.importorskip("transfer_queue")  # verl's v1 trainer imports it
    import inspect

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    fit = inspect.getsource(PPOTrainer.fit)
    assert fit.index("batch = self.step(metrics, self.timing_raw)") < fit.index("tq.kv_clear(keys=batch.keys")
    once = inspect.getsource(PPOTrainer._step_once)
    assert once.index("self._compute_advantage(batch") < once.index("self._update_actor(batch")
    old = inspect.getsource(PPOTrainer._compute_old_log_prob)
    assert 'fields=data.select("old_log_probs", "entropy")' in old


def test_install_writers_points_verls_lookups_at_the_subclasses(tmp_path, monkeypatch):
    pytest.importorskip("transfer_queue")  # verl's v1 trainer imports it
    import verl.trainer.main_ppo_v0 as v0
    from verl.trainer.ppo.v1 import trainer_base

    monkeypatch.setattr(v0, "RayPPOTrainer", v0.RayPPOTrainer)
    monkeypatch.setattr(trainer_base, "TRAINER_REGISTRY", dict(trainer_base.TRAINER_REGISTRY))
    cfg = _config(tmp_path)
    verl_main.install_writers(cfg)
    verl_main.install_writers(cfg)  # idempotent
    sync = trainer_base.get_trainer_cls("sync")
    assert sync._a3po_writes and sync.__mro__[2] is trainer_base.TRAINER_REGISTRY["sync"].__mro__[2]
    cfg.trainer.use_v1 = False
    verl_main.install_writers(cfg)
    assert v0.RayPPOTrainer._a3po_writes and v0.RayPPOTrainer.__name__ == "A3POLegacyTrainer"


def test_task_runner_installs_the_writers_then_runs_verls_runner(tmp_path, monkeypatch):
    """A3POTaskRunner's body: writers first, then the plain class behind verl's @ray.remote runner."""
    from verl.trainer.main_ppo import TaskRunnerV1

    seen = []

    class Runner:
        def run(self, config):
            seen.append(("run", config.trainer.use_v1))
            return "done"

    monkeypatch.setattr(verl_main, "install_writers", lambda config: seen.append(("install", None)))
    monkeypatch.setattr(verl_main, "_plain_class", lambda actor_cls: Runner)
    cfg = _config(tmp_path)
    assert verl_main._TaskRunner().run(cfg) == "done"
    assert seen == [("install", None), ("run", True)]
    monkeypatch.undo()
    plain = verl_main._plain_class(TaskRunnerV1)  # what Ray wrapped: a class with verl's run()
    assert isinstance(plain, type) and callable(plain.run) and plain().config is None
