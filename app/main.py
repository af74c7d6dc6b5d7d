"""A3PO Lab app entry point.

a3po app                # http://127.0.0.1:8501, on the store ./runs (seeded with the embedded runs if empty)
a3po app --store DIR --port 8502
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="A3PO Lab", layout="wide")
PAGES = Path(__file__).resolve().parent / "pages"
nav = st.navigation(
    [
        st.Page(PAGES / "runs.py", title="Runs", default=True),
        st.Page(PAGES / "rollouts.py", title="Rollouts"),
        st.Page(PAGES / "playground.py", title="Shaping playground"),
        st.Page(PAGES / "launch.py", title="Launch"),
        st.Page(PAGES / "polarity101.py", title="Polarity 101"),
    ]
)
nav.run()
