"""Every user mistake ends with one line ``a3po: error: <what> — <how to fix>``, exit 2, nothing written.

A table of bad inputs, each run through the real CLI entry point (``engine.cli.main``) in a scratch
folder: config files and overrides, datasets, model folders, store paths, CLI flags and file-system
states. For each case the test checks the exit status, that stderr is exactly one line of that form
naming the problem, that nothing reached stdout, and that no file under the scratch folder was
created, changed or removed (the case's own fixture files excepted).

    pytest tests/test_bad_inputs.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from conftest import ROOT

LINE = re.compile(r"^a3po: error: \S.* — \S.*$")
DEMO_RUN = ROOT / "data" / "store" / "demo-a3po"


# ------------------------------------------------------------------ fixture files a case may ask for
def _model_folder(d: Path, config: dict | str | None) -> str:
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(d)


def _write(d: Path, name: str, data: bytes | str) -> str:
    p = d / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(p)


def _store_with_finished_run(d: Path) -> str:
    shutil.copytree(DEMO_RUN, d / "store" / "demo-a3po")
    return str(d / "store")


def _earlier_export(d: Path) -> str:
    """A folder holding an earlier export (parquet and duckdb files) that must not be overwritten."""
    out = d / "exported"
    out.mkdir()
    _write(out, "runs.parquet", "earlier")
    _write(out, "demo-a3po.duckdb", "earlier")
    return str(out)


def _ro_store(d: Path) -> str:
    """A store path nobody can write to: a read-only folder, or (as root, who ignores modes) sysfs."""
    if os.geteuid() != 0:
        ro = d / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return str(ro / "runs")
    return "/sys/a3po-runs"


FIX = {
    "file": lambda d: _write(d, "plain.txt", "not a folder\n"),
    "dir": lambda d: (d / "folder").mkdir() or str(d / "folder"),
    "cfg_nonutf8": lambda d: _write(d, "c.yaml", b"seed: 1\nname: \xff\xfe\n"),
    "cfg_badyaml": lambda d: _write(d, "c.yaml", "train:\n  steps: [1, 2\n"),
    "cfg_tabs": lambda d: _write(d, "c.yaml", "train:\n\tsteps: 3\n"),
    "cfg_list": lambda d: _write(d, "c.yaml", "- 1\n- 2\n"),
    "cfg_scalar": lambda d: _write(d, "c.yaml", "hello\n"),
    "cfg_unknown": lambda d: _write(d, "c.yaml", "train:\n  stepz: 3\n"),
    "cfg_badtype": lambda d: _write(d, "c.yaml", "train:\n  steps: many\n"),
    "cfg_section_scalar": lambda d: _write(d, "c.yaml", "model: tiny\n"),
    "cfg_huge": lambda d: _write(d, "c.yaml", "train:\n  steps: 99999999999\n"),
    "ds_nonutf8": lambda d: _write(
        d, "d.jsonl", b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xff", "answer": "1"}\n'
    ),
    "ds_badjson": lambda d: _write(d, "d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n'),
    "ds_notobj": lambda d: _write(d, "d.jsonl", "[1, 2]\n"),
    "ds_noprompt": lambda d: _write(d, "d.jsonl", '{"question": "1+1=", "answer": "2"}\n'),
    "ds_emptyanswer": lambda d: _write(d, "d.jsonl", '{"prompt": "1+1=", "answer": ""}\n'),
    "ds_nullanswer": lambda d: _write(d, "d.jsonl", '{"prompt": "1+1=", "answer": null}\n'),
    "ds_intprompt": lambda d: _write(d, "d.jsonl", '{"prompt": 5, "answer": "5"}\n'),
    "ds_empty": lambda d: _write(d, "d.jsonl", "\n\n"),
    "ds_csv": lambda d: _write(d, "d.csv", "prompt,answer\n1+1=,2\n"),
    "ds_parquet": lambda d: _write(d, "d.parquet", b"PAR1 this is not parquet"),
    "m_noconfig": lambda d: _model_folder(d / "m", None),
    "m_badtype": lambda d: _model_folder(d / "m", {"model_type": "no-such-architecture", "vocab_size": 10}),
    "m_badjson": lambda d: _model_folder(d / "m", "{not json"),
    "m_noweights": lambda d: _model_folder(d / "m", json.loads((ROOT / "data/tiny-countdown/config.json").read_text())),
    "store_finished": _store_with_finished_run,
    "store_ro": _ro_store,
    "export_done": _earlier_export,
}


def _case(id, argv, expect, *fixtures):
    return pytest.param(argv, expect, fixtures, id=id)


# argv items "{name}" are replaced by the path the fixture `name` creates.
CASES = [
    # -------------------------------------------------------------- command line (argparse)
    _case("no-command", [], "required: cmd"),
    _case("unknown-command", ["trai"], "invalid choice: 'trai'"),
    _case("unknown-flag", ["train", "--bogus"], "unrecognized arguments: --bogus"),
    _case("eval-no-model", ["eval"], "required: --model"),
    _case("eval-flag-without-value", ["eval", "--model", "m", "--k"], "expected one argument"),
    _case("eval-n-prompts-not-int", ["eval", "--model", "m", "--n-prompts", "x"], "invalid int value: 'x'"),
    _case("eval-temperature-not-float", ["eval", "--model", "m", "--temperature", "hot"], "invalid float value"),
    _case("eval-seed-float", ["eval", "--model", "m", "--seed", "1.5"], "invalid int value: '1.5'"),
    _case("eval-unknown-verifier", ["eval", "--model", "m", "--verifier", "regex"], "invalid choice: 'regex'"),
    _case("export-no-args", ["export"], "required: run, dir"),
    _case("export-bad-format", ["export", "r", "d", "--format", "csv"], "invalid choice: 'csv'"),
    _case("study-bad-preset", ["study", "--preset", "huge"], "invalid choice: 'huge'"),
    _case("build-bad-task", ["build-tiny-model", "--task", "chess"], "invalid choice: 'chess'"),
    _case("runs-extra-arg", ["runs", "extra"], "unrecognized arguments: extra"),
    _case("app-port-too-big", ["app", "--port", "99999"], "--port must be between 1 and 65535"),
    _case("app-port-zero", ["app", "--port", "0"], "--port must be between 1 and 65535"),
    _case("app-port-not-int", ["app", "--port", "http"], "invalid int value: 'http'"),
    # -------------------------------------------------------------- eval flags
    _case("eval-k-letters", ["eval", "--model", "builtin:tiny-countdown", "--k", "a"], "--k must be comma-separated"),
    _case("eval-k-zero", ["eval", "--model", "builtin:tiny-countdown", "--k", "0"], "--k must list integers between 1"),
    _case("eval-k-negative", ["eval", "--model", "builtin:tiny-countdown", "--k", "1,-4"], "--k must list integers"),
    _case(
        "eval-k-empty-item", ["eval", "--model", "builtin:tiny-countdown", "--k", "1,,4"], "--k must be comma-separated"
    ),
    _case("eval-k-empty", ["eval", "--model", "builtin:tiny-countdown", "--k", ""], "--k must be comma-separated"),
    _case("eval-k-huge", ["eval", "--model", "builtin:tiny-countdown", "--k", "2000000"], "between 1 and 1024"),
    _case("eval-threads-zero", ["eval", "--model", "builtin:tiny-countdown", "--threads", "0"], "--threads must be"),
    _case(
        "eval-threads-negative", ["eval", "--model", "builtin:tiny-countdown", "--threads", "-2"], "--threads must be"
    ),
    _case(
        "eval-temperature-negative",
        ["eval", "--model", "builtin:tiny-countdown", "--temperature", "-1"],
        "--temperature must be between 0.0 and 100.0",
    ),
    _case(
        "eval-temperature-nan", ["eval", "--model", "builtin:tiny-countdown", "--temperature", "nan"], "finite number"
    ),
    _case(
        "eval-temperature-inf", ["eval", "--model", "builtin:tiny-countdown", "--temperature", "inf"], "finite number"
    ),
    _case(
        "eval-n-prompts-negative",
        ["eval", "--model", "builtin:tiny-countdown", "--n-prompts", "-1"],
        "--n-prompts must be between 0",
    ),
    _case(
        "eval-max-new-tokens-zero",
        ["eval", "--model", "builtin:tiny-countdown", "--max-new-tokens", "0"],
        "--max-new-tokens must be between 1",
    ),
    _case(
        "eval-max-new-tokens-huge",
        ["eval", "--model", "builtin:tiny-countdown", "--max-new-tokens", "99999999"],
        "--max-new-tokens must be between 1",
    ),
    _case(
        "eval-seed-negative", ["eval", "--model", "builtin:tiny-countdown", "--seed", "-1"], "--seed must be between 0"
    ),
    _case(
        "eval-seed-huge",
        ["eval", "--model", "builtin:tiny-countdown", "--seed", "99999999999999999999"],
        "--seed must be between 0",
    ),
    _case(
        "eval-device-unknown", ["eval", "--model", "builtin:tiny-countdown", "--device", "tpu"], "'tpu' is not valid"
    ),
    _case(
        "eval-device-cuda-absent",
        ["eval", "--model", "builtin:tiny-countdown", "--device", "cuda:7", "--n-prompts", "2"],
        "cuda:7",
    ),
    _case(
        "eval-empty-prompt-key",
        ["eval", "--model", "builtin:tiny-countdown", "--prompt-key", " "],
        "--prompt-key is empty",
    ),
    _case(
        "eval-unknown-split",
        ["eval", "--model", "builtin:tiny-countdown", "--split", "valid"],
        "dataset file not found",
    ),
    _case("eval-model-missing", ["eval", "--model", "/no/such/model"], "does not exist"),
    _case("eval-model-unknown-builtin", ["eval", "--model", "builtin:huge"], "unknown builtin model 'builtin:huge'"),
    _case("eval-model-is-file", ["eval", "--model", "{file}"], "is not a Hugging Face model folder"),
    _case("eval-model-no-config", ["eval", "--model", "{m_noconfig}"], "no config.json", "m_noconfig"),
    _case("eval-model-unknown-type", ["eval", "--model", "{m_badtype}"], "cannot load model", "m_badtype"),
    _case("eval-model-config-not-json", ["eval", "--model", "{m_badjson}"], "cannot load model", "m_badjson"),
    _case("eval-model-no-weights", ["eval", "--model", "{m_noweights}"], "cannot load model", "m_noweights"),
    _case(
        "eval-task-unknown-builtin",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "builtin:chess"],
        "unknown builtin dataset 'builtin:chess'",
    ),
    _case(
        "eval-task-missing",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "nope.jsonl"],
        "dataset file not found",
    ),
    _case("eval-task-folder", ["eval", "--model", "builtin:tiny-countdown", "--task", "{dir}"], "is a folder", "dir"),
    _case(
        "eval-task-non-utf8",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_nonutf8}"],
        "row 2 is not UTF-8",
        "ds_nonutf8",
    ),
    _case(
        "eval-task-bad-json",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_badjson}"],
        "row 2 is not valid JSON",
        "ds_badjson",
    ),
    _case(
        "eval-task-row-not-object",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_notobj}"],
        "row 1 is not a JSON object",
        "ds_notobj",
    ),
    _case(
        "eval-task-no-prompt",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_noprompt}"],
        "row 1 has no 'prompt' field",
        "ds_noprompt",
    ),
    _case(
        "eval-task-empty-answer",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_emptyanswer}"],
        "row 1 has an empty 'answer'",
        "ds_emptyanswer",
    ),
    _case(
        "eval-task-empty-file",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_empty}"],
        "no rows",
        "ds_empty",
    ),
    _case(
        "eval-task-csv",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_csv}"],
        "unsupported dataset format",
        "ds_csv",
    ),
    _case(
        "eval-task-corrupt-parquet",
        ["eval", "--model", "builtin:tiny-countdown", "--task", "{ds_parquet}"],
        "cannot read parquet",
        "ds_parquet",
    ),
    # -------------------------------------------------------------- config file
    _case("config-missing", ["train", "--config", "nope.yaml"], "config file not found"),
    _case("config-folder", ["train", "--config", "{dir}"], "is a folder", "dir"),
    _case("config-non-utf8", ["train", "--config", "{cfg_nonutf8}"], "is not UTF-8", "cfg_nonutf8"),
    _case("config-unclosed-list", ["train", "--config", "{cfg_badyaml}"], "is not valid YAML", "cfg_badyaml"),
    _case("config-tabs", ["train", "--config", "{cfg_tabs}"], "is not valid YAML", "cfg_tabs"),
    _case("config-top-level-list", ["train", "--config", "{cfg_list}"], "must hold a mapping", "cfg_list"),
    _case("config-top-level-scalar", ["train", "--config", "{cfg_scalar}"], "must hold a mapping", "cfg_scalar"),
    _case("config-unknown-key", ["train", "--config", "{cfg_unknown}"], "did you mean 'train.steps'", "cfg_unknown"),
    _case("config-bad-type", ["train", "--config", "{cfg_badtype}"], "expected int, got 'many'", "cfg_badtype"),
    _case(
        "config-section-scalar",
        ["train", "--config", "{cfg_section_scalar}"],
        "section 'model' must be a mapping",
        "cfg_section_scalar",
    ),
    _case(
        "config-huge-steps",
        ["train", "--config", "{cfg_huge}"],
        "'train.steps' must be between 1 and 1000000",
        "cfg_huge",
    ),
    # -------------------------------------------------------------- overrides: ranges the store can hold
    *[
        _case(f"override-{ov}", ["train", ov], msg)
        for ov, msg in [
            ("train.steps=0", "'train.steps' must be between 1"),
            ("train.steps=-1", "'train.steps' must be between 1"),
            ("train.steps=99999999999", "'train.steps' must be between 1 and 1000000"),
            ("train.steps=abc", "expected int, got 'abc'"),
            ("train.steps=1.5", "expected int, got 1.5"),
            ("train.steps=true", "expected int, got True"),
            ("train.steps=[1]", "expected int, got [1]"),
            ("seed=-1", "'seed' must be between 0"),
            ("seed=99999999999999", "'seed' must be between 0 and 2147483647"),
            ("seed=abc", "expected int"),
            ("rollout.n=0", "'rollout.n' must be between 1"),
            ("rollout.n=100000", "'rollout.n' must be between 1 and 1024"),
            ("rollout.temperature=-1", "'rollout.temperature' must be between 0.0"),
            ("rollout.temperature=.nan", "finite number"),
            ("rollout.temperature=.inf", "finite number"),
            ("rollout.top_p=1.5", "'rollout.top_p' must be between 0.0 and 1.0"),
            ("rollout.top_k=-1", "'rollout.top_k' must be between 0"),
            ("rollout.max_new_tokens=0", "'rollout.max_new_tokens' must be between 1"),
            ("rollout.max_new_tokens=10000000", "'rollout.max_new_tokens' must be between 1 and 131072"),
            ("rollout.backend=sglang", "'sglang' is not one of ['hf', 'kv', 'vllm']"),
            ("eval.k=[2000000]", "'eval.k' must list integers between 1 and 1024"),
            ("eval.k=[0]", "'eval.k' must list integers"),
            ("eval.k=[1.5]", "'eval.k' must list integers"),
            ("eval.k=[]", "'eval.k' is empty"),
            ("eval.k=[1,2", "is not a YAML list"),
            ("eval.k=a", "expected list, got 'a'"),
            ("eval.final_k=[0]", "'eval.final_k' must list integers"),
            ("eval.n_prompts=-1", "'eval.n_prompts' must be between 0"),
            ("eval.temperature=-1", "'eval.temperature' must be between 0.0"),
            ("eval.max_new_tokens=0", "'eval.max_new_tokens' must be between 1"),
            ("data.max_prompt_tokens=-5", "'data.max_prompt_tokens' must be between 1"),
            ("data.max_prompt_tokens=0", "'data.max_prompt_tokens' must be between 1"),
            ("data.prompt_template={prompt}{x}", "unknown field(s) {x}"),
            ("data.prompt_template={0}{prompt}", "unknown field(s) {0}"),
            ("data.prompt_template=no field", "must contain '{prompt}'"),
            ("data.prompt_template={prompt", "not a valid format string"),
            ("data.verifier=regex", "'regex' is not one of"),
            ("data.train=", "'data.train' is empty"),
            ("data.prompt_key=", "'data.prompt_key' is empty"),
            ("model.logit_chunk=0", "'model.logit_chunk' must be between 1"),
            ("model.device=tpu", "'model.device': 'tpu' is not valid"),
            ("model.dtype=int8", "'int8' is not one of"),
            ("model.path=", "'model.path' is empty"),
            ("algorithm.name=ppo2", "unknown algorithm 'ppo2'"),
            ("algorithm.ratio=0", "'algorithm.ratio' must be > 0.0"),
            ("algorithm.ratio=1.5", "'algorithm.ratio' must be > 0.0 and <= 1.0"),
            ("algorithm.decay=weird", "'weird' is not one of"),
            ("algorithm.w_pos=-1", "'algorithm.w_pos' must be >= 0.0"),
            ("algorithm.alpha_pos=abc", "expected float, got 'abc'"),
            ("algorithm.token_rules=[5]", "token_rules[0]' must be a mapping"),
            ("algorithm.token_rules=[{polarity: sideways}]", "token_rules[0]'"),
            ("algorithm.max_gen_batches=0", "'algorithm.max_gen_batches' must be between 1"),
            ("actor.lr=0", "'actor.lr' must be > 0.0"),
            ("actor.lr=-1", "'actor.lr' must be > 0.0"),
            ("actor.betas=[0.9]", "'actor.betas' must be two numbers"),
            ("actor.betas=[1.5,0.9]", "'actor.betas' must be two numbers"),
            ("actor.mini_batches=100000", "'actor.mini_batches' must be between 1 and 65536"),
            ("actor.mini_batches=1000", "exceeds the batch size"),
            ("actor.loss_agg_mode=foo", "'foo' is not one of"),
            ("actor.kl_type=k9", "'k9' is not one of"),
            ("actor.clip_ratio_c=0.5", "'actor.clip_ratio_c' must be >= 1.0"),
            ("actor.ppo_epochs=0", "'actor.ppo_epochs' must be between 1"),
            ("train.prompts_per_step=0", "'train.prompts_per_step' must be between 1"),
            ("train.threads=0", "'train.threads' must be between 1"),
            ("train.compact_every=0", "'train.compact_every' must be between 1"),
            ("train.eval_every=-1", "'train.eval_every' must be between 0"),
            ("train.checkpoint_every=99999999999", "'train.checkpoint_every' must be between 0 and 1000000"),
            ("name=../evil", "invalid run id '../evil'"),
            ("name=a b", "invalid run id 'a b'"),
            ("train.stepz=3", "did you mean 'train.steps'"),
            ("foo=1", "unknown config key 'foo'"),
            ("model=3", "section 'model' must be a mapping"),
            ("seed.x=1", "config key 'seed': expected int"),
            ("steps", "is not key=value"),
            ("=5", "has an empty key"),
        ]
    ],
    _case(
        "override-batch-too-big",
        ["train", "train.prompts_per_step=1000", "rollout.n=1000"],
        "responses per step exceeds",
    ),
    _case("override-model-missing", ["train", "model.path=/no/such/model"], "does not exist"),
    _case("override-model-unknown-type", ["train", "model.path={m_badtype}"], "cannot load model", "m_badtype"),
    _case("override-device-cuda-absent", ["train", "model.device=cuda:7"], "cuda:7"),
    _case("override-dataset-folder", ["train", "data.train={dir}"], "is a folder", "dir"),
    _case("override-dataset-non-utf8", ["train", "data.test={ds_nonutf8}"], "not UTF-8", "ds_nonutf8"),
    _case(
        "override-dataset-null-answer",
        ["train", "data.train={ds_nullanswer}"],
        "has an empty 'answer'",
        "ds_nullanswer",
    ),
    _case("override-dataset-int-prompt", ["train", "data.train={ds_intprompt}"], "non-string 'prompt'", "ds_intprompt"),
    # -------------------------------------------------------------- store paths and run state
    _case("train-store-is-file", ["train", "--store", "{file}"], "is a file, not a folder", "file"),
    _case("train-store-under-file", ["train", "--store", "{file}/runs"], "lies under the file", "file"),
    _case("train-store-read-only", ["train", "--store", "{store_ro}"], "is not writable", "store_ro"),
    _case("runs-store-is-file", ["runs", "--store", "{file}"], "is a file, not a folder", "file"),
    _case("resume-missing-run", ["train", "--resume", "nope"], "no run 'nope'"),
    # the main environment has no vLLM (its own: make install-vllm)
    _case("train-vllm-not-installed", ["train", "rollout.backend=vllm"], "vllm does not import in this environment"),
    _case("resume-bad-run-id", ["train", "--resume", "../x"], "invalid run id '../x'"),
    _case("resume-with-overrides", ["train", "--resume", "x", "train.steps=3"], "drop --config"),
    _case(
        "resume-finished-run",
        ["train", "--resume", "demo-a3po", "--store", "{store_finished}"],
        "already finished",
        "store_finished",
    ),
    _case("export-missing-run", ["export", "nope", "out"], "no run 'nope'"),
    _case("export-bad-run-id", ["export", "../x", "out"], "invalid run id '../x'"),
    _case(
        "export-parquet-over-existing",
        ["export", "demo-a3po", "{export_done}", "--store", "{store_finished}"],
        "exists — remove it",
        "export_done",
        "store_finished",
    ),
    _case(
        "export-duckdb-over-existing",
        ["export", "demo-a3po", "{export_done}", "--format", "duckdb", "--store", "{store_finished}"],
        "exists — remove it",
        "export_done",
        "store_finished",
    ),
    _case(
        "export-into-file",
        ["export", "demo-a3po", "{file}", "--store", "{store_finished}"],
        "{file}",
        "file",
        "store_finished",
    ),
    # -------------------------------------------------------------- study and build-tiny-model flags
    _case("study-seeds-zero", ["study", "--seeds", "0"], "--seeds must be between 1"),
    _case("study-steps-huge", ["study", "--steps", "99999999999"], "--steps must be between 1 and 1000000"),
    _case("study-jobs-zero", ["study", "--jobs", "0"], "--jobs must be between 1"),
    _case("study-only-unknown", ["study", "--only", "grpo,foo"], "unknown setting(s) foo"),
    _case("study-bad-id", ["study", "--id", "../x", "--out", "rep"], "invalid run id '../x'"),
    _case("study-config-missing", ["study", "--config", "nope.yaml", "--out", "rep"], "config file not found"),
    _case("study-bad-override", ["study", "--out", "rep", "train.steps=0"], "'train.steps' must be between 1"),
    _case("build-steps-zero", ["build-tiny-model", "--steps", "0", "--out", "m"], "--steps must be between 1"),
    _case("build-seed-negative", ["build-tiny-model", "--seed", "-3", "--out", "m"], "--seed must be between 0"),
]


def _fill(text: str, made: dict[str, str]) -> str:
    """Replace ``{name}`` by the fixture path ``name`` made; other braces (templates) stay as they are."""
    return re.sub(r"\{(\w+)\}", lambda m: made.get(m.group(1), m.group(0)), text)


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A scratch working folder; the SIGTERM handler `a3po train` installs is put back afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("A3PO_STORE", str(tmp_path / "runs"))
    handler = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, handler)


def test_the_table_is_large_enough():
    assert len(CASES) >= 100


@pytest.mark.parametrize("argv, expect, fixtures", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(sandbox, capsys, argv, expect, fixtures):
    from engine.cli import main

    names = set(fixtures) | {n for a in argv for n in re.findall(r"\{(\w+)\}", a) if n in FIX}
    made = {n: FIX[n](sandbox) for n in sorted(names)}
    argv, expect = [_fill(a, made) for a in argv], _fill(expect, made)
    before = _tree(sandbox)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err[-2000:]}"
    assert LINE.match(lines[0]), lines[0]
    assert expect in lines[0], lines[0]
    assert out == ""
    assert _tree(sandbox) == before, "a refused command changed files"


@pytest.mark.parametrize(
    "err, fix",
    [
        (errno_, fix)
        for errno_, fix in [
            ("ENOSPC", "free some disk space"),
            ("EROFS", "read-only"),
            ("EACCES", "fix its permissions"),
            ("EEXIST", "remove it or pick another path"),
        ]
    ],
)
def test_file_system_states_are_one_line(monkeypatch, capsys, err, fix):
    """A full disk, a read-only file system, a permission or an existing path met mid-command."""
    import errno

    import engine.cli as cli

    def boom(a):
        code = getattr(errno, err)
        raise OSError(code, os.strerror(code), "/data/runs/x/segments")

    monkeypatch.setattr(cli, "cmd_runs", boom)
    assert cli.main(["runs"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and LINE.match(line) and fix in line and "/data/runs/x/segments" in line


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("x"), FileNotFoundError(2, "gone", "/x")])
def test_genuine_bugs_keep_their_traceback(monkeypatch, exc):
    """Anything that is not a user mistake propagates (traceback, exit 1) instead of hiding as one line."""
    import engine.cli as cli

    def boom(a):
        raise exc

    monkeypatch.setattr(cli, "cmd_runs", boom)
    with pytest.raises(type(exc)):
        cli.main(["runs"])


def test_runs_lists_every_other_run_when_one_run_json_is_out_of_range(tmp_path, capsys):
    """A run folder holding values the runs table cannot type (hand-edited, older version) is named, not fatal."""
    from engine.cli import main

    store = Path(_store_with_finished_run(tmp_path))
    (store / "zz-bad").mkdir()
    meta = json.loads((store / "demo-a3po" / "run.json").read_text())
    (store / "zz-bad" / "run.json").write_text(json.dumps({**meta, "run_id": "zz-bad", "last_step": 99999999999}))
    (store / "zz-corrupt").mkdir()
    (store / "zz-corrupt" / "run.json").write_text("{not json")
    assert main(["runs", "--store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[1:]}
    assert rows["demo-a3po"].rstrip().endswith("finished")
    assert "invalid" in rows["zz-bad"] and "last_step 99999999999 out of range" in rows["zz-bad"]
    assert "invalid" in rows["zz-corrupt"] and "not valid JSON" in rows["zz-corrupt"]
