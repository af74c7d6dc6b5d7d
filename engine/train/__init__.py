"""The training loop (``trainer``: sample, score, shape, update, store, one step at a time, with
checkpoints and resume) and the evaluation it runs (``evaluate``: greedy accuracy and pass@k). It is the
one room that imports every stage.
"""
