"""Launch: start short training runs in the background through the real CLI and watch them live.

Only on a server that listens on a loopback address (or was started with ``--allow-launch``): see
``app.access``. Elsewhere the page says why and shows no form; launched runs stay listed read-only.
"""

import json
import time
from pathlib import Path

import streamlit as st
import yaml

from app.access import LaunchDisabled, disabled_reason, launch_status
from app.common import get_store, q, runs_df, safe_run_id
from app.launcher import get_launcher
from engine.config import ConfigError
from engine.resources import demo_config
from engine.store.store import StoreError

st.title("Launch")
store = get_store()
L = get_launcher(str(store.root))
allowed, host = launch_status()


def base_config() -> dict:
    """The settings a new run starts from: the playground's, a stored run's or the demo config."""
    source = st.radio(
        "Settings from",
        ["Shaping playground", "A stored run's config", "The demo config"],
        horizontal=True,
        key="ln_source",
    )
    base = yaml.safe_load(demo_config().read_text())
    if source == "A stored run's config":
        df = runs_df()
        if len(df):
            src = st.selectbox("Stored run", df.run_id.tolist(), key="ln_src_run")
            try:
                base = store.read_run(safe_run_id(src))["config"]
            except (StoreError, ValueError) as e:  # run.json changed or broke since the table was read
                st.error(f"Cannot read {src}'s config: {e}")
                st.stop()
    elif source == "Shaping playground":
        pg = st.session_state.get("playground_settings")
        if pg:
            base["algorithm"] = {**base.get("algorithm", {}), **pg["algorithm"]}
            st.caption("Algorithm settings from the playground: " + json.dumps(pg["algorithm"]))
        else:
            st.caption("Open the Shaping playground first to carry its settings here; using the demo config.")
    return base


def launch_form() -> None:
    """The run settings and the button that queues the run."""
    base = base_config()
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.number_input("Steps", min_value=1, max_value=2000, value=20, key="ln_steps")
    n = c2.number_input(
        "Group size G", min_value=2, max_value=64, value=int(base.get("rollout", {}).get("n", 8)), key="ln_n"
    )
    prompts = c3.number_input(
        "Prompts per step",
        min_value=1,
        max_value=256,
        value=int(base.get("train", {}).get("prompts_per_step", 16)),
        key="ln_prompts",
    )
    seed = c4.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="ln_seed")
    name = st.text_input(
        "Run name",
        value=f"app-{time.strftime('%Y%m%d-%H%M%S')}",
        key="ln_name",
        help="letters, digits, '.', '_' or '-'; the run is stored under this name",
    )
    if st.button("Run with these settings", type="primary", key="ln_go"):
        cfg = {**base, "seed": int(seed)}
        cfg["train"] = {
            **cfg.get("train", {}),
            "steps": int(steps),
            "prompts_per_step": int(prompts),
            "eval_every": max(1, int(steps) // 4),
            "checkpoint_every": max(1, int(steps) // 4),
        }
        cfg["rollout"] = {**cfg.get("rollout", {}), "n": int(n)}
        cfg["eval"] = {**cfg.get("eval", {}), "n_prompts": min(int(cfg.get("eval", {}).get("n_prompts", 200)), 50)}
        try:
            job = L.submit(cfg, name)
            st.success(f"Queued {job.run_id}.")
        except (ConfigError, ValueError, LaunchDisabled) as e:
            st.error(f"Refused: {e}")


@st.fragment(run_every=1.0)
def live():
    """This server's launched runs with live progress; Stop buttons only where launching is on."""
    if not L.jobs:
        st.caption("No launched runs in this session yet.")
        return
    for j in reversed(L.jobs):
        with st.container(border=True, key=f"ln_job_{j.run_id}"):
            st.markdown(f"**{j.run_id}** — {j.state}")
            s = (
                q(
                    "select step, reward, acc, entropy, length, t_step from steps where run_id = ? order by step",
                    [j.run_id],
                    run_ids=[j.run_id],
                )
                if (store.root / j.run_id / "run.json").exists()
                else None
            )
            total = yaml.safe_load(Path(j.config_path).read_text())["train"]["steps"]
            done = int(s.step.max()) if s is not None and len(s) else 0
            st.progress(min(1.0, done / total), text=f"step {done}/{total}")
            if s is not None and len(s):
                st.dataframe(s.tail(5), hide_index=True, width="stretch")
            if j.state == "failed":
                st.error(j.last_error() or "failed")
            if allowed and j.state in ("running", "queued") and st.button("Stop", key=f"stop_{j.run_id}"):
                L.stop(j.run_id)


if allowed:
    launch_form()
else:
    st.warning(disabled_reason(host))
live()
