"""The CLI's contract with a user: one line per bad input, an exit code, no traceback.

These run ``glm`` as a subprocess, as a user would, and need no trained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GLM = str(Path(sys.executable).with_name("glm"))
ROOT = Path(__file__).resolve().parents[1]


def glm(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    merged.update(env or {})
    return subprocess.run(
        [GLM, *args], env=merged, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback anywhere, exactly one 'error:' line naming the needles."""
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_import_glm_does_not_import_orchestration():
    code = "import sys, glm, glm.cli; print('prefect' in sys.modules, 'mlflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_missing_corpus_path(tmp_path):
    missing = tmp_path / "nope.txt"
    done = glm("run", "--corpus", str(missing), "--workspace", str(tmp_path / "ws"))
    assert_one_line_error(done, "nope.txt")
    assert list((tmp_path / "ws" / "logs").glob("*.log")), "details go to WORKSPACE/logs/"
    assert not (tmp_path / "ws" / "stages").exists()


def test_unknown_extension(tmp_path):
    odd = tmp_path / "corpus.docx"
    odd.write_text("some text")
    done = glm("run", "--corpus", str(odd), "--workspace", str(tmp_path / "ws"))
    assert_one_line_error(done, "corpus.docx")


def test_debug_shows_the_traceback(tmp_path):
    done = glm("run", "--corpus", str(tmp_path / "nope.txt"), "--debug", "-w", str(tmp_path))
    assert done.returncode != 0
    assert "Traceback" in done.stderr


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--max-steps", "-5"], "max_steps"),
        (["--preset", "huge"], "preset"),
        (["--until", "deploy"], "until"),
        (["--force", "everything"], "force"),
    ],
)
def test_invalid_parameters_name_the_field(tmp_path, flags, field):
    corpus = Path(__file__).resolve().parents[1] / "data" / "kjv-genesis.jsonl"
    done = glm("run", "--corpus", str(corpus), "-w", str(tmp_path), *flags)
    assert_one_line_error(done, "invalid parameter", field)


def test_config_file_typo_names_the_setting(tmp_path):
    config = tmp_path / "glm.yaml"
    config.write_text("tokenizer:\n  vocab_sise: 900\n")
    corpus = Path(__file__).resolve().parents[1] / "data" / "kjv-genesis.jsonl"
    done = glm("run", "--corpus", str(corpus), "-w", str(tmp_path), "--config", str(config))
    assert_one_line_error(done, "tokenizer", "vocab_sise")


def test_bad_jsonl_is_refused_before_prefect_starts(tmp_path):
    # Every record is read before the flow starts: a bad one costs a second, not a Prefect
    # server start, and leaves no Prefect home, no stage output and no last_run.json.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "In the beginning."}\n{"text": oops}\n')
    ws = tmp_path / "ws"
    done = glm("run", "--corpus", str(bad), "-w", str(ws), "--preset", "tiny")
    assert_one_line_error(done, "bad.jsonl", "line 2")
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert not (ws / "prefect").exists() and not (ws / "stages").exists()
    assert not (ws / "last_run.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["fill", "In the [MASK]."],
        ["promote", "3"],
        ["eval", "--model", "models:/glm@champion", "--corpus", "data/kjv-genesis.jsonl"],
    ],
    ids=["fill", "promote", "eval"],
)
def test_readers_refuse_a_workspace_without_a_registry_and_create_nothing(tmp_path, args):
    ws = tmp_path / "never-made"
    done = glm(*args, "-w", str(ws))
    line = assert_one_line_error(done, "no model registry here", str(ws))
    assert "run `glm run` first" in line
    assert not ws.exists()


def test_an_unusable_registry_is_refused_before_training(tmp_path):
    ws = tmp_path / "ws"
    corpus = str(ROOT / "data")
    done = glm("run", "--corpus", corpus, "-w", str(ws), "--tracking-uri", "bogus://x")
    assert_one_line_error(done, "bogus://x: cannot use the MLflow registry")
    assert not (ws / "prefect").exists() and not (ws / "stages").exists()


@pytest.mark.parametrize("registry", ["unreachable server", "corrupt sqlite file"])
@pytest.mark.parametrize("command", [["fill", "In the [MASK]."], ["promote", "1"]])
def test_readers_say_why_the_registry_cannot_be_used(tmp_path, registry, command):
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {}
    if registry == "unreachable server":
        env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:1"  # nothing listens: no retries
    else:
        (ws / "mlflow.db").write_bytes(b"not a database, " * 300)
    done = glm(*command, "-w", str(ws), env=env, timeout=60)
    assert_one_line_error(done, "cannot use the MLflow registry")


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--top-p", "2", "top_p"),
        ("--temperature", "-1", "temperature"),
        ("--temperature", "nan", "temperature"),
        ("--temperature", "inf", "temperature"),
        ("--max-new-tokens", "0", "max_new_tokens"),
    ],
)
def test_fill_names_a_bad_generation_setting(tmp_path, flag, value, named):
    done = glm("fill", "In the [MASK].", "-w", str(tmp_path), flag, value)
    assert_one_line_error(done, f"generation setting {named}")


def test_verify_reports_every_bad_file(tmp_path):
    from glm.shards import ShardConfig, write_shards
    from glm.split import SplitConfig, split_corpus
    from glm.tokenizer import TokenizerConfig, train_tokenizer

    ws = tmp_path / "ws"
    corpus = str(Path(__file__).resolve().parents[1] / "data" / "zh-classics.jsonl")
    split_corpus([corpus], ws / "stages/split/a", SplitConfig(workers=1))
    train_tokenizer(
        ws / "stages/split/a", ws / "stages/tokenizer/a", TokenizerConfig(vocab_size=3000)
    )
    write_shards(
        ws / "stages/split/a", ws / "stages/tokenizer/a", ws / "stages/shard/a", ShardConfig()
    )
    done = glm("verify", str(ws))
    assert done.returncode == 0, done.stdout + done.stderr

    manifest = json.loads((ws / "stages/shard/a/manifest.json").read_text())
    shard = ws / "stages/shard/a" / manifest["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ckpt = ws / "stages/train/a/checkpoints/step-00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"short")
    (ckpt / "checkpoint.json").write_text(
        json.dumps({"format": 1, "step": 10, "sha256": {"model.safetensors": "0" * 64}})
    )
    done = glm("verify", str(ws))
    assert done.returncode == 3
    bad = [line for line in done.stdout.splitlines() if line.startswith("bad:")]
    assert len(bad) == 2, done.stdout
    assert shard.name in bad[0] or shard.name in bad[1]
    assert any("model.safetensors" in line for line in bad)


def test_a_workspace_that_cannot_be_created_is_one_line(tmp_path):
    corpus = Path(__file__).resolve().parents[1] / "data" / "kjv-genesis.jsonl"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = glm("run", "--corpus", str(corpus), "--workspace", str(blocker))
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {blocker}: cannot create the workspace: ")
    assert "Traceback" not in done.stdout + done.stderr
