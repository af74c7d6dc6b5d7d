"""Every writer's run opens on every app page, playground included.

Each writer in ``WRITERS`` produces a small finished run with its real code path into a store of its
own; every page is then driven with Streamlit's AppTest on that store and must render the run's data
without an exception: the engine's trainer, TRL's GRPOTrainer and the verl driver-side writer. Adding
a writer is one entry in ``WRITERS``.
"""

import pytest
import torch
from conftest import ROOT
from streamlit.testing.v1 import AppTest

from engine.store.store import Store

PAGES = ROOT / "app" / "pages"


def _trainer_run(root, backend: str = "hf") -> str:
    """The engine's own trainer: 2 steps of 2 prompts x 4 rollouts, evals at the end (the code default's
    ``hf`` backend records no sampler log-probs; ``kv`` does: the mismatch is measured)."""
    from engine.config import load_config
    from engine.train.trainer import Trainer

    cfg = load_config(
        None,
        [
            "name=trainer-run",
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.n=4",
            "eval.n_prompts=4",
            "eval.k=[1,2]",
            "train.eval_every=0",
            "train.save_final_model=false",
            "train.threads=1",
            f"rollout.backend={backend}",
        ],
    )
    return Trainer(cfg, Store(root), log=lambda s: None).fit(progress=False)["run_id"]


def _trl_run(root) -> str:
    """TRL's GRPOTrainer through engine.integrations.trl: 2 steps of 2 prompts x 4 completions."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from engine.integrations.trl import A3POGRPOTrainer
    from engine.model.policy import load_policy
    from engine.tasks.problems import load_problems
    from engine.tasks.reward import is_correct

    model, tok, _ = load_policy("builtin:tiny", device="cpu")
    data = Dataset.from_list(
        [
            {"prompt": tok.bos_token + p.prompt, "answer": p.answer}
            for p in load_problems("builtin:arith", "train", limit=16)
        ]
    )
    args = trl.GRPOConfig(
        output_dir=str(root.parent / "trl-out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        learning_rate=1e-5,
        save_strategy="no",
        temperature=1.0,
        top_k=0,
        beta=0.0,
        seed=0,
        bf16=False,
    )
    tr = A3POGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, answer, **kw: [float(is_correct(c, a)) for c, a in zip(completions, answer)],
        args=args,
        train_dataset=data,
        processing_class=tok,
        store=str(root),
        run_name="trl-run",
        data="builtin:arith",
        model_path="builtin:tiny",
    )
    tr.train()
    return tr.a3po_run


def _verl_run(root) -> str:
    """The verl integration's driver-side writer (engine.integrations.verl_records): 2 steps whose
    batches hold what verl's trainer has at its advantage stage: real responses of the embedded model,
    old log-probs, GRPO advantages broadcast over tokens, scores and group uids; no entropies."""
    from engine.config import config_from_dict, load_config
    from engine.integrations import verl_records as vr
    from engine.shaping.advantage import group_advantages
    from engine.shaping.algorithms import resolve
    from engine.train.trainer import Timer, Trainer

    verl = {
        "model_path": "builtin:tiny-countdown",
        "n": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_response_length": 32,
        "max_prompt_length": 64,
        "train_batch_size": 4,
        "total_training_steps": 2,
        "lr": 1e-6,
        "ppo_epochs": 1,
        "seed": 0,
        "train_file": "builtin:countdown",
    }
    cfg = vr.engine_config(vr.parse_a3po_args(["a3po.run_name=verl-run"]), verl)
    r = resolve(config_from_dict(cfg))
    gen = Trainer(
        load_config(
            None,
            [
                "model.path=builtin:tiny-countdown",
                "data.train=builtin:countdown",
                "data.test=builtin:countdown",
                "train.prompts_per_step=4",
                "rollout.n=4",
                "rollout.max_new_tokens=32",
                "eval.n_prompts=2",
                "train.threads=1",
            ],
        ),
        Store(root.parent / "scratch"),
        log=lambda s: None,
    )
    text, decode = gen.vocab_text, gen.tok.batch_decode
    w = vr.RunWriter(Store(root), cfg, r.to_dict(), str(root.parent / "verl-ckpt"))
    for step in (1, 2):
        b = gen.sample(step, Timer())
        old = gen._old_policy(b.ro).logprobs.detach()
        scores = torch.tensor(b.rewards)
        adv = group_advantages(scores, b.group).unsqueeze(-1) * b.ro.response_mask
        batch = vr.VerlBatch(
            responses=b.ro.response_ids,
            response_mask=b.ro.response_mask,
            old_log_probs=old,
            advantages=adv,
            scores=scores,
            uid=[f"p{i}" for i in b.prompt_idx],
            entropy=None,
            prompts=[gen.train_set[i].prompt for i in b.prompt_idx],
            answers=[gen.train_set[i].answer for i in b.prompt_idx],
        )
        rec = vr.step_records(
            "pending",
            step,
            batch,
            r,
            lambda ids: text.take(ids).to_pylist(),
            lambda rows: decode(rows, skip_special_tokens=True),
        )
        w.write(step, rec)
    w.finish()
    return w.run_id


# name -> function(store folder) -> run id.
WRITERS = {
    "trainer": _trainer_run,
    "trainer-kv": lambda root: _trainer_run(root, "kv"),
    "trl": _trl_run,
    "verl": _verl_run,
}


@pytest.fixture(scope="module", params=list(WRITERS))
def written(request, tmp_path_factory):
    """(store folder, run id) of one writer's finished run, made once per module."""
    root = tmp_path_factory.mktemp(request.param) / "runs"
    threads = torch.get_num_threads()
    try:
        rid = WRITERS[request.param](root)
    finally:
        torch.set_num_threads(threads)
    assert Store(root).read_run(rid)["status"] == "finished"
    return root, rid


@pytest.fixture
def run(written, monkeypatch):
    """The run id, with the app pointed at its store and launching on (as `a3po app` on loopback)."""
    root, rid = written
    monkeypatch.setenv("A3PO_STORE", str(root))
    monkeypatch.setenv("A3PO_ALLOW_LAUNCH", "1")
    monkeypatch.setenv("A3PO_HOST", "127.0.0.1")
    return rid


def page(name, **state):
    at = AppTest.from_file(str(PAGES / name), default_timeout=120)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _stored(rid, sql):
    return Store(_root()).query(sql, [rid], run_ids=[rid])


def _root():
    import os

    return os.environ["A3PO_STORE"]


def _traces(at):
    import json

    return {t.get("name"): t for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]}


def test_steps_rows_have_every_registered_column(run):
    from engine.store.schema import SCHEMAS

    steps = _stored(run, "select * from steps where run_id = ? order by step")
    assert list(steps.columns) == SCHEMAS["steps"].names
    assert steps.step.tolist() == [1, 2]
    assert steps[["reward", "acc", "length", "n_rollouts"]].notna().all().all()  # entropy may be "not measured"


def test_runs_page(run):
    at = page("runs.py")
    row = at.dataframe[0].value.set_index("run_id").loc[run]
    total = Store(_root()).read_run(run)["total_steps"]
    assert (row.status, row.last_step, row.total_steps) == ("finished", 2, total)
    assert at.multiselect(key="runs_sel").value == [run]
    traces = _traces(at)
    for col in ("reward", "length", "frac_all_correct", "frac_all_wrong"):
        assert f"{run}: {col}" in traces, (col, sorted(traces))
    # entropy is plotted when the writer measured it (a verl run whose actor skipped it has none)
    measured = _stored(run, "select count(*) filter (where not isnan(entropy)) n from steps where run_id = ?").n[0] > 0
    assert (f"{run}: entropy" in traces) == bool(measured)
    push = at.dataframe[1].value.set_index("run_id")
    assert push.loc[run, "source"] == "recorded" and push.loc[run, "steps"] == 2


def test_rollouts_page(run):
    at = page("rollouts.py", run=run)
    assert at.selectbox(key="run").value == run
    ro = _stored(run, "select * from rollouts where run_id = ? and step = 2 order by rollout_idx")
    assert any(f"gold answer `{ro.answer.iloc[0]}`" in m.value for m in at.markdown)
    html = "".join(h.proto.body for h in at.get("html"))
    assert html.count('class="tok') > 0 and "shaped adv=" in html


def test_playground_page(run):
    at = page("playground.py", run=run)
    assert at.session_state["playground_settings"]["source_run"] == run
    assert at.select_slider(key="pg_step").value == 2
    n_tok = int(_stored(run, "select count(*) n from tokens where run_id = ? and step = 2").n.iloc[0])
    assert at.metric[0].label == "Key tokens (this rule)" and 0 < int(at.metric[0].value) <= n_tok
    assert 'class="tok' in "".join(h.proto.body for h in at.get("html"))
    # ratio 1: every token of a correct or wrong response is a key token (polarity 0, e.g. a verl
    # group with equal rewards, gets no rule)
    signed = _stored(run, "select count(*) n from tokens where run_id = ? and step = 2 and polarity != 0")
    at.slider(key="pg_ratio").set_value(1.0).run()
    assert not at.exception and int(at.metric[0].value) == int(signed.n.iloc[0]) > 0


def test_launch_page_starts_from_the_runs_config(run):
    cfg = Store(_root()).read_run(run)["config"]
    at = page("launch.py", ln_source="A stored run's config", ln_src_run=run)
    assert at.number_input(key="ln_n").value == cfg["rollout"]["n"]
    assert at.number_input(key="ln_prompts").value == cfg["train"]["prompts_per_step"]


def test_polarity101_and_main_pages(run):
    page("polarity101.py")
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.run()
    assert not at.exception and at.title[0].value == "Runs"


def test_mismatch_shown_where_the_writer_recorded_sampler_logprobs(run):
    """Rollouts colours by the sampler mismatch and Runs plots it for a run whose backend records sampler
    log-probs (kv); every other writer's run says "not measured" on both pages, without an error."""
    measured = bool(
        _stored(
            run,
            "select count(rollout_logprob) filter (where not isnan(rollout_logprob)) n from tokens where run_id = ?",
        ).n[0]
    )
    assert measured == (Store(_root()).read_run(run)["config"]["rollout"]["backend"] == "kv")  # only kv records them
    at = page("rollouts.py", run=run)
    at.selectbox(key="ro_quantity").set_value("sampler mismatch").run()
    assert not at.exception and not at.error
    html = "".join(h.proto.body for h in at.get("html"))
    assert ("Δlog p (trainer − sampler)=" in html) == measured
    assert any("Mismatch not measured" in i.value for i in at.info) != measured
    runs = page("runs.py")
    assert any(f"Not measured (no sampler log-probs stored): {run}" in m.value for m in runs.markdown) != measured
