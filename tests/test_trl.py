"""TRL integration for real: 2 GRPOTrainer steps on the embedded model on CPU, rows the app reads."""

import pytest

trl = pytest.importorskip("trl")  # installed by the [test] extra, so CI runs this

from datasets import Dataset  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from conftest import ROOT  # noqa: E402
from engine.integrations.trl import A3POGRPOTrainer  # noqa: E402
from engine.policy import load_policy  # noqa: E402
from engine.reward import is_correct  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.tasks import load_problems  # noqa: E402


def reward(completions, answer, **kw):
    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]


def test_trl_two_steps_write_rows_the_app_reads(tmp_path, monkeypatch):
    model, tok, _ = load_policy("builtin:tiny", device="cpu")
    ds = Dataset.from_list([{"prompt": tok.bos_token + p.prompt, "answer": p.answer}
                            for p in load_problems("builtin:arith", "train", limit=32)])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=48, max_steps=2, use_cpu=True, report_to=[], learning_rate=1e-5,
                          save_strategy="no", temperature=1.0, top_k=0, beta=0.0, seed=0, bf16=False)
    tr = A3POGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                         store=str(tmp_path / "runs"), run_name="trl-a3po")
    tr.train()
    store = Store(tmp_path / "runs")
    assert store.read_run("trl-a3po")["status"] == "finished"
    tok_rows = store.query("select step, rollout_idx, is_key, adv_raw, adv_shaped, polarity from tokens")
    ro = store.query("select * from rollouts")
    assert len(tok_rows) == int(ro.length.sum()) > 0
    assert sorted(tok_rows.step.unique()) == [1, 2]
    # the engine's A3PO shaping acted: keys picked per response, unpicked tokens keep the raw advantage
    assert tok_rows.is_key.any()
    plain = tok_rows[~tok_rows.is_key]
    assert (abs(plain.adv_shaped - plain.adv_raw) < 1e-6).all()
    # polarity is the verifier's verdict
    assert set(ro.polarity) <= {1, -1} and ((ro.polarity == 1) == ro.correct).all()
    # the app's Rollouts page reads the TRL run
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app" / "pages" / "rollouts.py"), default_timeout=60)
    at.session_state["run"] = "trl-a3po"
    at.run()
    assert not at.exception
    assert 'class="tok' in "".join(h.proto.body for h in at.get("html"))


def test_unknown_a3po_option_is_refused(tmp_path):
    model, tok, _ = load_policy("builtin:tiny", device="cpu")
    ds = Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 8)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=1, use_cpu=True, report_to=[], save_strategy="no")
    with pytest.raises(ValueError, match="alpha_p0s"):
        A3POGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                        a3po={"alpha_p0s": 3})
