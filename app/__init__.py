"""A3PO Lab's Streamlit app: runs, rollouts, shaping playground, launcher, Polarity 101."""
