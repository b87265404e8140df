"""Security: no pickles in what is registered or loaded, loopback servers, inert paths, no
leaked credentials.

One tiny pipeline run (in-process, the session's Prefect server) registers a model that the
artifact checks walk; a second run of the same workspace against a tracking URI with a
password fails at registration, and nothing it leaves behind may contain the password.
"""

from __future__ import annotations

import ast
import json
import os
import pickletools
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GLM = str(Path(sys.executable).with_name("glm"))
SOURCES = sorted(p for d in ("glm", "flows", "bench", "tests") for p in (ROOT / d).rglob("*.py"))
SECRET = "s3cretPassw0rd"


def _cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(extra)
    return env


# pickles --------------------------------------------------------------------------------------


def _calls(tree: ast.AST, module: str, name: str):
    """Calls of ``module.name(...)`` (e.g. ``torch.load``) in a parsed file."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == name
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == module
        ):
            yield node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_every_torch_load_passes_weights_only_true():
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch", "load"):
            value = _keyword(call, "weights_only")
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            assert isinstance(value, ast.Constant) and value.value is True, where
            found.append(where)
    assert any(w.startswith("glm/train.py") for w in found), "the checkpoint loader was not seen"


def test_no_pickle_module_and_no_allow_pickle_in_the_code():
    for path in SOURCES:
        if path.parent.name == "tests":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cloudpickle", "dill", "joblib"} & set(names), path
            if isinstance(node, ast.Call):
                value = _keyword(node, "allow_pickle")
                assert not (isinstance(value, ast.Constant) and value.value), path


class _Touch:
    """A pickle that, when loaded by an unsafe loader, creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_with_a_pickled_object_is_refused_not_executed(tmp_path):
    import torch
    from safetensors.torch import save_model

    from glm.config import get_preset
    from glm.digest import sha256_file
    from glm.errors import IntegrityError
    from glm.model import GLM
    from glm.train import load_checkpoint

    model = GLM(get_preset("tiny").model)
    ckpt = tmp_path / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _Touch(str(marker))}, ckpt / "state.pt")
    # the attacker controls checkpoint.json too, so the checksums match
    files = {n: sha256_file(ckpt / n) for n in ("model.safetensors", "state.pt")}
    (ckpt / "checkpoint.json").write_text(json.dumps({"format": 1, "step": 1, "sha256": files}))

    with pytest.raises(IntegrityError, match="cannot load checkpoint"):
        load_checkpoint(ckpt, model)
    assert not marker.exists()


def _pickle_findings(root: Path) -> list[str]:
    """Every file under ``root`` that is, or contains, a pickle stream."""
    bad = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if path.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt"):
            bad.append(f"{rel}: pickle file name")
        head = path.read_bytes()[:2]
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            try:
                list(pickletools.genops(path.read_bytes()))
                bad.append(f"{rel}: pickle protocol {head[1]} stream")
            except Exception:
                pass
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad += [f"{rel}!{n}: pickle in archive" for n in z.namelist() if ".pkl" in n]
    return bad


@pytest.fixture(scope="module")
def registered(prefect_api, tmp_path_factory) -> dict:
    """One tiny run to registration; returns its summary and workspace."""
    from flows.params import PipelineParams
    from flows.pipeline import glm_pipeline

    ws = tmp_path_factory.mktemp("secure-ws")
    params = PipelineParams.model_validate(
        {
            "corpus": [str(ROOT / "data" / "*.jsonl")],
            "workspace": str(ws),
            "preset": "tiny",
            "max_steps": 4,
            "tracking_uri": f"sqlite:///{ws / 'mlflow.db'}",
            "retries": 0,
            "tokenizer": {"vocab_size": 3000},
            "eval": {"cloze_items": 20, "span_windows": 4, "greedy_spans": 2},
        }
    )
    summary = glm_pipeline(params)
    assert summary["model"]["version"] == 1
    return {"ws": ws, "summary": summary, "params": params}


def test_registered_model_artifacts_hold_no_pickle(registered):
    ws = registered["ws"]
    (mlmodel,) = list((ws / "mlartifacts").rglob("MLmodel"))
    model_dir = mlmodel.parent
    assert _pickle_findings(ws / "mlartifacts") == []
    names = {p.name for p in model_dir.rglob("*") if p.is_file()}
    assert "model.safetensors" in names and "spm.model" in names
    flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
    # models-from-code: the model is a source file, not a cloudpickled PythonModel object
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model", flavor
    assert "python_model" not in flavor, flavor
    assert (model_dir / Path(flavor["model_code_path"]).name).is_file()
    assert not [n for n in names if n.endswith((".pkl", ".pickle"))]


def test_stage_outputs_hold_no_pickle_outside_weights_only_checkpoints(registered):
    ws = registered["ws"]
    findings = _pickle_findings(ws / "stages")
    # checkpoint state is torch.save'd plain types, read back with weights_only=True only
    assert all("/checkpoints/step-" in f and "state.pt" in f for f in findings), findings


# servers ------------------------------------------------------------------------------------


def test_nothing_is_configured_to_bind_all_interfaces():
    texts = [p for d in ("glm", "flows") for p in (ROOT / d).rglob("*.py")]
    texts += [ROOT / n for n in ("prefect.yaml", "README.md", "Makefile") if (ROOT / n).exists()]
    for path in texts:
        text = path.read_text()
        assert "0.0.0.0" not in text and "::/0" not in text, path
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if "server start" in line or "models serve" in line:
            assert "127.0.0.1" in line or "--host" not in line, line


def _listening(pid_root: int) -> set[str]:
    """Local addresses of TCP sockets in LISTEN state owned by ``pid_root`` or descendants."""
    pids, frontier = {pid_root}, [pid_root]
    while frontier:
        pid = frontier.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            if kid not in pids:
                pids.add(kid)
                frontier.append(kid)
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr = cols[1].split(":")[0]
                found.add(
                    addr if width == 32 else ".".join(str(b) for b in bytes.fromhex(addr)[::-1])
                )
    return found


@pytest.mark.slow
def test_the_ephemeral_prefect_server_binds_loopback_only(tmp_path):
    # A real `glm run` starting its own Prefect server; its sockets are read from /proc while
    # it runs (no timing: polled until the run exits).
    env = _cli_env(PREFECT_HOME=str(tmp_path / "ws" / "prefect"))
    env.pop("PREFECT_API_URL", None)
    corpus = str(ROOT / "data" / "kjv-genesis.jsonl")
    cmd = [GLM, "run", "--corpus", corpus, "-w", str(tmp_path / "ws"), "--until", "split"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: set[str] = set()
    while proc.poll() is None:
        seen |= _listening(proc.pid)
        time.sleep(0.2)
    out = proc.stdout.read().decode()
    assert proc.returncode == 0, out
    assert seen, "no listening socket seen: the run started no server?"
    loopback = {"127.0.0.1", "00000000000000000000000001000000"}
    assert seen <= loopback, seen


# inert input --------------------------------------------------------------------------------


def test_shell_metacharacters_in_a_corpus_path_are_just_a_missing_file(tmp_path):
    spec = "$(touch pwned1); touch pwned2 | touch pwned3 && `touch pwned4` > pwned5"
    done = subprocess.run(
        [GLM, "run", "--corpus", spec, "-w", str(tmp_path / "ws"), "--until", "split"],
        cwd=tmp_path,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    # resolved against the working directory and reported, never run by a shell
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path}/{spec}: path does not exist"]
    assert not list(tmp_path.glob("pwned*"))
    assert not (tmp_path / "ws" / "stages").exists()


def test_a_config_file_cannot_construct_python_objects(tmp_path):
    from flows.params import load_config_file
    from glm.errors import InputError

    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"preset: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_config_file(config)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["glm' or name != '", "../../etc", "glm; drop table x", ""])
def test_model_names_that_could_escape_a_registry_query_are_rejected(name):
    from pydantic import ValidationError

    from flows.params import PipelineParams

    with pytest.raises(ValidationError, match="model_name"):
        PipelineParams(corpus=["data"], model_name=name)


# credentials --------------------------------------------------------------------------------


def _leaks(ws: Path) -> list[str]:
    """Files of the workspace (Prefect's database aside) that hold the secret."""
    return [
        str(p.relative_to(ws))
        for p in ws.rglob("*")
        if p.is_file() and p.suffix != ".db" and SECRET.encode() in p.read_bytes()
    ]


def test_tracking_uri_credentials_never_reach_logs_or_summaries(registered, prefect_api):
    # the CLI refuses the unreachable server before training, naming it without the password
    ws = registered["ws"]
    uri = f"http://glmuser:{SECRET}@127.0.0.1:1"
    cmd = [GLM, "run", "--corpus", str(ROOT / "data" / "*.jsonl"), "-w", str(ws)]
    cmd += ["--preset", "tiny", "--max-steps", "4", "--retries", "0", "--tracking-uri", uri]
    env = _cli_env(PREFECT_API_URL=prefect_api)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: http://***@127.0.0.1:1: cannot use the MLflow registry" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert _leaks(ws) == []


def test_a_registration_failure_inside_the_flow_does_not_leak_credentials(registered, monkeypatch):
    # past the CLI's check (a deployment runs the flow directly): registration fails, and
    # neither the error nor last_run.json carries the password
    from flows.pipeline import glm_pipeline

    ws = registered["ws"]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://glmuser:{SECRET}@127.0.0.1:1"
    params = registered["params"].model_copy(update={"tracking_uri": uri})
    state = glm_pipeline(params, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert "***@127.0.0.1:1" in str(error) and SECRET not in str(error)
    assert _leaks(ws) == []
