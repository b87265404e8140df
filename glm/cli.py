"""The ``glm`` command line: run the pipeline, fill blanks, evaluate, promote, verify, demo.

A thin layer: every command validates its input, then calls ``flows`` (imported inside the
command, so ``import glm`` never imports Prefect or MLflow) or the ``glm`` core. Bad input
ends with one line on the console naming the file and place, exit code 2, and no traceback
unless ``--debug``; the full details go to WORKSPACE/logs/.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from glm.errors import InputError, IntegrityError, Interrupted

log = logging.getLogger("glm.cli")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, register and use General Language Models (GLM) on your own text.",
)

REPO = Path(__file__).resolve().parents[1]
DEMO_TEXTS = [
    "In the beginning God created the [MASK] and the earth.",
    "And God said, Let there be [MASK]: and there was light.",
    "And Adam knew Eve his [MASK]; and she conceived.",
    "床前明月光，疑是地上[MASK]。",
    "春眠不觉晓，处处闻[MASK]。",
]

RESUME = "finished stages stay cached: run the same command again to resume"

Workspace_ = Annotated[
    Path, typer.Option("--workspace", "-w", help="Directory holding all pipeline state.")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on the console.")]


# error handling and environment -------------------------------------------------------------


class _ConsoleQuiet(logging.Filter):
    """Keeps errors (and the tracebacks Prefect formats into them) off the console: the CLI
    prints its own one-line error, the log file keeps everything. Prefect's INFO lines that
    announce a failed state repeat that error, so they stay in the file too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        return not record.getMessage().startswith("Finished in state Failed")


def _log_file(workspace: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return workspace / "logs" / f"glm-{stamp}-{os.getpid()}.log"


def _setup_logging(workspace: Path, debug: bool) -> Path:
    """Console (INFO, no errors unless --debug) + a DEBUG file in WORKSPACE/logs/.

    Call after Prefect is imported: Prefect replaces the root logger's handlers when it
    sets its logging up, and only leaves a console handler in place if none exists.
    """
    path = _log_file(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s"))
        root.addHandler(console)
    for handler in root.handlers:
        if not debug and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_ConsoleQuiet())
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    logging.getLogger("glm").setLevel(logging.INFO)
    logging.getLogger("flows").setLevel(logging.INFO)
    return path


def _prefect_env(workspace: Path) -> None:
    """Prefect and MLflow state in the workspace, never in ~; set before Prefect is imported."""
    os.environ.setdefault("PREFECT_HOME", str(workspace / "prefect"))
    # Prefect creates its home without parents and its server then fails to open the DB.
    try:
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the workspace: {e.strerror}", workspace) from None
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "glm,flows")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def _fail(message: str, code: int, workspace: Path | None) -> typer.Exit:
    """Print one line, keep the traceback in the workspace log, return the exit to raise."""
    detail = traceback.format_exc()
    if workspace is not None and workspace.is_dir():  # never create a workspace to say so
        path = _log_file(workspace)
        # best effort: when the workspace itself is the problem, the console line says so
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"error: {message}\n{detail}\n")
            log.debug("traceback written to %s", path)
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _reported(workspace: Path | None, debug: bool) -> Iterator[None]:
    """Turn exceptions into one console line and an exit code (unless --debug)."""
    from pydantic import ValidationError

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt as err:
        if debug:
            raise
        what = "SIGTERM" if str(err) == "SIGTERM" else "Ctrl-C"
        raise _fail(f"interrupted ({what}); {RESUME}", 130, workspace) from None
    except Exception as err:
        if debug:
            raise
        if isinstance(err, Interrupted):
            raise _fail(f"interrupted: {err}; {RESUME}", 130, workspace) from None
        if isinstance(err, InputError):
            raise _fail(str(err), 2, workspace) from None
        if isinstance(err, ValidationError):
            from flows.params import describe_validation_error

            raise _fail(
                f"invalid parameter {describe_validation_error(err)}", 2, workspace
            ) from None
        if isinstance(err, IntegrityError):
            raise _fail(f"integrity: {err}", 3, workspace) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _fail(f"{type(err).__name__}: {first}", 1, workspace) from None


# glm run ------------------------------------------------------------------------------------


def _params(config: Path | None, **flags):
    """Config file values, overridden by the flags that were given, validated."""
    from flows.params import PipelineParams, load_config_file

    values = load_config_file(config) if config is not None else {}
    values.update({k: v for k, v in flags.items() if v not in (None, [], ())})
    return PipelineParams.model_validate(values)


def run_pipeline(params, debug: bool = False) -> dict:
    """Pre-flight checks, then the flow under the workspace lock; returns the summary."""
    from glm.corpus import resolve_corpus

    ws = Path(params.workspace).expanduser().resolve()
    try:
        ws.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the workspace: {e.strerror}", ws) from None
    preflight(params, resolve_corpus(params.corpus), ws)
    _prefect_env(ws)
    from flows.pipeline import glm_pipeline
    from flows.workspace import Workspace, file_lock

    log_path = _setup_logging(ws, debug)
    log.info("full log: %s", log_path)
    workspace = Workspace.at(ws)
    # One run per workspace at a time: Prefect's ephemeral server and MLflow's sqlite file
    # are shared, and a second run can only gain from the first one's cached stages.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_interrupts)
    with file_lock(workspace.lock_path("run"), "another glm run on this workspace"):
        _start_prefect_server()
        state = glm_pipeline(params, return_state=True)
    if state.is_completed():
        return state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    retry = (
        f"PREFECT_HOME={os.environ['PREFECT_HOME']} {Path(sys.executable).with_name('prefect')} "
        f"flow-run retry {flow_run_id} "
        f"--entrypoint {REPO / 'flows' / 'pipeline.py'}:glm_pipeline"
    )
    from glm.atomic import write_json_atomic

    error = state.result(raise_on_failure=False)
    write_json_atomic(
        workspace.last_run,
        {"status": "failed", "error": str(error), "flow_run_id": flow_run_id, "retry": retry},
    )
    if not isinstance(error, InputError):  # running again cannot fix bad input
        log.info("flow run %s failed; completed stages stay cached. Retry: %s", flow_run_id, retry)
    if isinstance(error, BaseException):
        raise error
    raise RuntimeError(f"flow run {flow_run_id} ended {state.name}")


def _start_prefect_server() -> None:
    """Start Prefect's temporary API server now (unless PREFECT_API_URL names one), deaf to
    Ctrl-C and SIGTERM.

    It is Prefect's own ephemeral server, which the flow would start anyway. The child
    inherits a blocked SIGINT and SIGTERM, so a Ctrl-C in the terminal, or a SIGTERM sent to
    the whole process group (systemd does), stops this run, which then still has a server
    to report its state to. This process kills the server when it exits; a SIGKILL of the
    group takes it down as before.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    server = SubprocessASGIServer()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    # Registered after Prefect's own stop, so it runs first: Prefect's SIGTERM would wait 5 s.
    atexit.register(_kill_server, server)


def _kill_server(server) -> None:
    process = server.server_process
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def _sigterm_interrupts(signum, frame) -> None:
    """SIGTERM outside training (which checkpoints first) stops the run like a Ctrl-C."""
    raise KeyboardInterrupt("SIGTERM")


def preflight(params, files: list, ws: Path) -> None:
    """Refuse bad input before Prefect starts: every corpus record (unless this exact corpus
    already passed the split stage), the training device and the registry."""
    from flows.keys import COMPLETE_MARKER, plan_stages
    from flows.workspace import STAGES, Workspace
    from glm.shards import check_corpus

    workspace = Workspace.at(ws)
    plan = plan_stages(params, files)
    split_dir = workspace.stage_dir("split", plan.keys["split"])
    reaches = STAGES[: STAGES.index(params.until) + 1]
    if params.forced("split") or not (split_dir / COMPLETE_MARKER["split"]).is_file():
        val_modulus = params.stage_config("shard").val_modulus if "shard" in reaches else None
        check_corpus(files, params.stage_config("split"), val_modulus)
    if "train" in reaches:
        from glm.train import resolve_device

        resolve_device(params.device)
    if "register" in reaches:
        from flows.registry import check_registry

        check_registry(workspace, params.tracking_uri)


def print_summary(summary: dict) -> None:
    """The few lines a user reads after a run."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="glm run", show_header=False, box=None)
    table.add_row("stages", "  ".join(f"{k}:{v}" for k, v in summary["stages"].items()))
    m = summary.get("metrics") or {}
    if "val_bpb" in m:
        xz = f"{m['xz_bpb']:.4f}" if isinstance(m.get("xz_bpb"), float) else "n/a"
        table.add_row("val bits/byte", f"{m['val_bpb']:.4f}  (xz conditional: {xz})")
    if "cloze_acc" in m:
        table.add_row(
            "cloze accuracy",
            f"{m['cloze_acc']:.3f}  (unigram baseline {m.get('unigram_cloze_acc', 0):.3f})",
        )
    model = summary.get("model")
    if model:
        table.add_row("model", f"{model['name']} v{model['version']} -> {model['alias']}")
        table.add_row("gate", model["gate_reason"])
        table.add_row("mlflow run", str(summary.get("mlflow_run_id")))
    table.add_row("flow run", str(summary.get("flow_run_id")))
    table.add_row("summary", str(Path(summary["workspace"]) / "last_run.json"))
    console.print(table)


@app.command()
def run(
    corpus: Annotated[
        list[str] | None,
        typer.Option("--corpus", "-c", help="File, directory or glob; repeatable."),
    ] = None,
    workspace: Workspace_ = Path("workspace"),
    preset: Annotated[str | None, typer.Option(help="tiny, small or base.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML/TOML file overriding any stage setting.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Stop after: split, tokenizer, shard, train, evaluate, register."),
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option(help="Rerun STAGE and everything after it.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda.")] = None,
    on_decode_error: Annotated[
        str | None, typer.Option(help="Invalid UTF-8: error (default), replace or skip.")
    ] = None,
    retries: Annotated[int | None, typer.Option(help="Retries per task.")] = None,
    retry_backoff: Annotated[
        float | None, typer.Option(help="First retry delay in seconds; doubles after.")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default WORKSPACE/mlflow.db).")
    ] = None,
    debug: Debug = False,
) -> None:
    """Run the pipeline: split, tokenizer, shard, train, evaluate, register."""
    with _reported(workspace.resolve(), debug):
        # Absolute paths in the flow's parameters: `prefect flow-run retry` may run from
        # another directory and must find the same corpus and workspace.
        params = _params(
            config,
            corpus=[os.path.abspath(os.path.expanduser(c)) for c in corpus] if corpus else corpus,
            workspace=str(workspace.expanduser().resolve()),
            preset=preset,
            max_steps=max_steps,
            seed=seed,
            model_name=model_name,
            until=until,
            force=force,
            device=device,
            on_decode_error=on_decode_error,
            retries=retries,
            retry_backoff_s=retry_backoff,
            tracking_uri=tracking_uri,
        )
        print_summary(run_pipeline(params, debug))


# glm fill / eval / promote / verify ---------------------------------------------------------


def resolve_package(model: str, workspace: Path, tmp: Path) -> Path:
    """A model URI or directory -> a local glm model package directory.

    Accepts ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/...`` (resolved in
    the workspace's registry unless MLFLOW_TRACKING_URI is set), an MLflow model directory,
    a model package, a train stage directory (its ``final/``) or one of its checkpoints.
    """
    if "://" in model or model.startswith(("models:/", "runs:/")):
        from flows.registry import check_registry, model_package, open_registry, require_registry
        from flows.workspace import Workspace

        ws = Workspace.at(workspace)
        require_registry(ws)
        check_registry(ws)
        open_registry(ws.root)
        return model_package(model, tmp / "download")
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError("model directory does not exist", path)
    if (path / "MLmodel").is_file():
        from flows.registry import package_in_model_dir

        return package_in_model_dir(path)
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if (path / "checkpoint.json").is_file():
        return _package_from_checkpoint(path, tmp)
    raise InputError("not a model: expected an MLflow model, a model package or a checkpoint", path)


def _package_from_checkpoint(ckpt: Path, tmp: Path) -> Path:
    """A checkpoint's weights with its training run's config and tokenizer, as a package."""
    import shutil

    from glm.digest import sha256_file

    template = ckpt.parents[1] / "final"
    if not (template / "config.json").is_file():
        raise InputError("checkpoint's training run has no final/ package (tokenizer)", ckpt)
    problems = verify_checkpoint(ckpt)
    if problems:
        raise IntegrityError(problems[0])
    package = tmp / "package"
    shutil.copytree(template, package)
    shutil.copy(ckpt / "model.safetensors", package / "model.safetensors")
    config = json.loads((package / "config.json").read_text())
    config["weights_sha256"] = sha256_file(package / "model.safetensors")
    (package / "config.json").write_text(json.dumps(config))
    return package


def verify_checkpoint(ckpt: Path) -> list[str]:
    """One line per missing or altered file of a checkpoint directory."""
    from glm.digest import sha256_file

    meta = ckpt / "checkpoint.json"
    try:
        expected = json.loads(meta.read_text())["sha256"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{meta}: unreadable checkpoint manifest ({err})"]
    problems = []
    for name, digest in expected.items():
        f = ckpt / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{f}: sha256 mismatch (truncated or altered)")
    return problems


@app.command()
def fill(
    texts: Annotated[
        list[str], typer.Argument(help="Texts with \\[MASK], \\[sMASK] or \\[gMASK] blanks.")
    ],
    model: Annotated[str, typer.Option(help="models:/glm@champion or a model directory.")] = (
        "models:/glm@champion"
    ),
    workspace: Workspace_ = Path("workspace"),
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per blank.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 is greedy; above 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    debug: Debug = False,
) -> None:
    """Fill the blanks of each TEXT with a trained model."""
    ws = workspace.resolve()
    with _reported(ws, debug), tempfile.TemporaryDirectory() as tmp:
        from glm.generate import GenerationConfig, fill_blanks
        from glm.package import load_package

        if not any(b in t for t in texts for b in ("[MASK]", "[sMASK]", "[gMASK]")):
            raise InputError("no blank in the text: write [MASK], [sMASK] or [gMASK]")
        cfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, seed)
        glm_model, tokenizer = load_package(resolve_package(model, ws, Path(tmp)))
        for text, filled in zip(texts, fill_blanks(glm_model, tokenizer, texts, cfg), strict=True):
            typer.echo(f"{text}\n  -> {filled}")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="models:/glm@champion or a model directory.")],
    corpus: Annotated[list[str], typer.Option("--corpus", "-c", help="Text to score; repeatable.")],
    workspace: Workspace_ = Path("workspace"),
    debug: Debug = False,
) -> None:
    """Score a model on a corpus: bits per byte, span and cloze accuracy, baselines.

    Half the documents (picked by a hash of their id) are scored; the other half is the
    text the unigram and xz baselines are fitted on.
    """
    ws = workspace.resolve()
    with _reported(ws, debug):
        from glm.corpus import resolve_corpus
        from glm.evaluate import EvalConfig, evaluate
        from glm.shards import ShardConfig, write_shards
        from glm.split import SplitConfig, split_corpus

        resolve_corpus(corpus)
        # scratch space next to the workspace's data when there is one; never create one
        with tempfile.TemporaryDirectory(dir=ws if ws.is_dir() else None, prefix=".eval-") as tmp:
            tmp = Path(tmp)
            package = resolve_package(model, ws, tmp)
            split_corpus(corpus, tmp / "sentences", SplitConfig())
            shard_cfg = ShardConfig(val_modulus=2)
            write_shards(tmp / "sentences", package / "tokenizer", tmp / "shards", shard_cfg)
            metrics = evaluate(package, tmp / "shards" / "manifest.json", EvalConfig())
        typer.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="Model version to make champion.")],
    model_name: str = "glm",
    workspace: Workspace_ = Path("workspace"),
    debug: Debug = False,
) -> None:
    """Move the champion alias to VERSION by hand (e.g. a rollback)."""
    ws = workspace.resolve()
    with _reported(ws, debug):
        from flows.registry import promote as promote_version

        previous = promote_version(ws, model_name, version)
        typer.echo(f"{model_name}: champion v{previous} -> v{version}")


@app.command()
def verify(
    workspace: Annotated[Path, typer.Argument(help="Workspace to check.")] = Path("workspace"),
    debug: Debug = False,
) -> None:
    """Check every shard and checkpoint checksum in a workspace; list each bad file."""
    ws = workspace.resolve()
    with _reported(None, debug):
        from glm.shards import ShardReader

        if not (ws / "stages").is_dir():
            raise InputError("not a workspace (no stages/ directory)", ws)
        problems: list[str] = []
        checked = 0
        for manifest in sorted(ws.glob("stages/shard/*/manifest.json")):
            try:
                problems += ShardReader(manifest).verify()
            except (IntegrityError, OSError, ValueError) as err:
                problems.append(f"{manifest}: {err}")
            checked += 1
        for ckpt in sorted(ws.glob("stages/train/*/checkpoints/step-*")):
            problems += verify_checkpoint(ckpt)
            checked += 1
        for line in problems:
            typer.echo(f"bad: {line}")
        typer.echo(f"checked {checked} shard sets and checkpoints: {len(problems)} problem(s)")
        if problems:
            raise typer.Exit(3)  # a corrupt artifact, as for `glm run`


# glm demo -----------------------------------------------------------------------------------


@app.command()
def demo(
    workspace: Workspace_ = Path("workspace"),
    preset: str = "small",
    max_steps: Annotated[int | None, typer.Option(help="Training steps (demo budget).")] = None,
    debug: Debug = False,
) -> None:
    """The whole pipeline on the bundled English/Chinese sample, then a few filled blanks."""
    ws = workspace.resolve()
    with _reported(ws, debug):
        from flows.params import PipelineParams, load_config_file

        values = load_config_file(REPO / "flows" / "demo.yaml")
        values.update(workspace=str(ws), preset=preset)
        if max_steps is not None:
            values["max_steps"] = max_steps
        values["corpus"] = [str(REPO / c) for c in values["corpus"]]
        summary = run_pipeline(PipelineParams.model_validate(values), debug)
        print_summary(summary)
        fill_examples(summary, ws)


def fill_examples(summary: dict, workspace: Path) -> None:
    """Load the champion through MLflow's pyfunc, as a service would, and fill blanks."""
    import mlflow

    from flows.registry import open_registry

    open_registry(workspace)
    name = summary["model"]["name"]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    for text, filled in zip(DEMO_TEXTS, model.predict(DEMO_TEXTS), strict=True):
        typer.echo(f"{text}\n  -> {filled}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
