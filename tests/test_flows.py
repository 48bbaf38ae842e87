"""Prefect orchestration end to end: a real local Prefect server, the served deployments, a run
triggered through the API (what the UI's Run button does), plus unit tests of params_file and aliases.

The server (PREFECT_HOME in tmp) and the served deployments (`flows/deployments.py` in a throwaway
project copy) are started once for the module; the pipeline runs at toy scale (about a minute).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import BIN, REPO, copy_project, run_cmd
from lmforge.orchestration.overrides import apply_overrides
from lmforge.params import ParamsError, load_params
from lmforge.stages import STAGES, read_metrics
from test_team import (  # noqa: F401  (module fixtures: PostgreSQL + the MLflow server, sshd)
    checkout,
    push_pull_and_compare,
    shared,
    ssh_remote,
    use_key,
)

pytestmark = pytest.mark.slow

MODEL = "lmforge-chat"
SERVER_STARTUP_S = 180  # the first database migration on an empty PREFECT_HOME is slow here
RUN_TIMEOUT_S = 240
CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

# Toy scale: the whole pipeline in about a minute on 2 cores. Gates relaxed: every version is champion.
TOY = {
    "model.n_layer": 1,
    "model.n_embd": 32,
    "model.n_head": 2,
    "model.n_kv_head": 1,
    "model.block_size": 64,
    "tokenizer.vocab_size": 512,
    "pretrain.max_steps": 4,
    "pretrain.val_every_steps": 2,
    "pretrain.val_batches": 2,
    "pretrain.batch_size": 4,
    "pretrain.warmup_steps": 1,
    "pretrain.log_every_steps": 1,
    "pretrain.checkpoint_every_steps": 100,
    "sft.max_steps": 3,
    "sft.batch_size": 4,
    "sft.warmup_steps": 1,
    "sft.val_every_steps": 2,
    "sft.val_batches": 2,
    "sft.log_every_steps": 1,
    "sft.eval_prompts": 4,
    "reward.max_steps": 3,
    "reward.batch_size": 4,
    "reward.warmup_steps": 1,
    "reward.val_every_steps": 2,
    "reward.val_batches": 2,
    "reward.log_every_steps": 1,
    "rlhf.max_steps": 2,
    "rlhf.rollout_batch_size": 2,
    "rlhf.group_size": 2,
    "rlhf.max_new_tokens": 8,
    "rlhf.warmup_steps": 0,
    "rlhf.log_every_steps": 1,
    "rlhf.eval_prompts": 4,
    "evaluate.eval_prompts": 4,
    "evaluate.max_new_tokens": 8,
    "registry.gates.min_reward_gain": -100.0,
    "registry.gates.min_reward_accuracy": 0.0,
    "registry.gates.max_val_bits_per_byte": 100.0,
    "registry.gates.min_end_of_turn_rate": 0.0,
    # Toy models differ by chance, not by a margin a paired test would trust: every version is
    # champion here (tests/test_promotion.py runs the comparison with the champion).
    "registry.promotion.compare_with_champion": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"{what}: not ready after {timeout} s\n{tail(log)}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 and the lmforge deployments served from a project copy."""
    tmp = tmp_path_factory.mktemp("flows")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LMFORGE_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api,
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # a new schedule's first run in seconds
        TOKENIZERS_PARALLELISM="false",
    )
    server_log = tmp / "server.log"
    with open(server_log, "w") as fh:
        server = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    procs = [server]
    try:
        root = copy_project(tmp / "proj")  # while the server migrates its database
        shutil.copytree(REPO / "services", root / "services", ignore=shutil.ignore_patterns("__pycache__"))
        run_cmd([BIN / "dvc", "init", "--no-scm", "-q"], root)
        wait_until(
            lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200,
            SERVER_STARTUP_S,
            "prefect server",
            server,
            server_log,
        )
        serve_env = {**env, "LMFORGE_ROOT": str(root), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        serve_log = tmp / "serve.log"
        with open(serve_log, "w") as fh:
            served = subprocess.Popen(
                [sys.executable, REPO / "flows" / "deployments.py"],
                cwd=root,
                env=serve_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(served)

        def deployed() -> bool:
            r = httpx.get(f"{api}/deployments/name/lmforge-pipeline/local", timeout=5)
            return r.status_code == 200

        wait_until(deployed, 120, "served deployments", served, serve_log)
        yield {"api": api, "root": root, "serve_log": serve_log}
    finally:
        for proc in reversed(procs):
            stop(proc)


def run_pipeline(api: str, parameters: dict):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return run_deployment(name="lmforge-pipeline/local", parameters=parameters, timeout=RUN_TIMEOUT_S)


def read_run_details(api: str, flow_run_id) -> tuple[list, list]:
    """(artifacts, task runs) of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=flt), client.read_task_runs(flow_run_filter=flt)


def registered_versions(root: Path) -> list:
    from mlflow import MlflowClient

    db = root / ".lmforge" / "mlflow" / "mlflow.db"
    if not db.exists():
        return []
    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name = '{MODEL}'")


# --------------------------------------------------------------------------- end to end through Prefect


def test_pipeline_runs_from_the_deployment_with_overrides(stack):
    root = stack["root"]
    flow_run = run_pipeline(stack["api"], {"preset": "tiny", "overrides": TOY})
    state = flow_run.state
    assert state is not None and state.is_completed(), f"{state}\n{tail(stack['serve_log'])}"

    # One artifact per stage, plus the params record and the final one naming the version and alias.
    artifacts, task_runs = read_run_details(stack["api"], flow_run.id)
    by_key = {a.key: a for a in artifacts}
    assert {f"lmforge-{s}" for s in STAGES} | {
        "lmforge-registered-model",
        "lmforge-params",
        "lmforge-summary",
    } <= set(by_key)
    assert "(first champion): every gate passed" in by_key["lmforge-summary"].data
    assert (
        "MLflow run" in by_key["lmforge-pretrain"].data
        and "val_bits_per_byte" in by_key["lmforge-pretrain"].data
    )
    reg = read_metrics(root, "register")
    assert reg["alias"] in ("champion", "candidate")
    final = by_key["lmforge-registered-model"].data
    assert f"version {reg['version']}" in final and f"`{reg['alias']}`" in final
    assert sorted(t.name for t in task_runs if t.name in STAGES) == sorted(STAGES)

    # params.yaml records the run's overrides (so `dvc repro` reproduces it), comments kept.
    text = (root / "params.yaml").read_text()
    assert "# lmforge parameters" in text and "# strict: bad input stops" in text
    raw = yaml.safe_load(text)
    assert raw["preset"] == "tiny" and raw["pretrain"]["max_steps"] == 4 and raw["model"]["n_embd"] == 32
    assert load_params(root / "params.yaml").tokenizer.vocab_size == 512
    assert run_cmd([BIN / "dvc", "status", "register"], root).stdout.strip().endswith("up to date.")

    # Registered in the project's own MLflow store, with the alias the register stage reported.
    from mlflow import MlflowClient

    assert any(int(v.version) == reg["version"] for v in registered_versions(root))
    uri = f"sqlite:///{root}/.lmforge/mlflow/mlflow.db"
    holder = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(MODEL, reg["alias"])
    assert int(holder.version) == reg["version"]


def test_a_failing_stage_fails_the_run_with_its_own_error(stack):
    root = stack["root"]
    before = len(registered_versions(root))
    original = (root / "params.yaml").read_text()
    try:
        flow_run = run_pipeline(
            stack["api"], {"overrides": {"ingest.text_sources": [{"path": "data/raw/missing.txt"}]}}
        )
    finally:
        (root / "params.yaml").write_text(original)
    state = flow_run.state
    assert state is not None and state.is_failed(), f"{state}\n{tail(stack['serve_log'])}"
    assert "data/raw/missing.txt: file not found" in (state.message or "")
    _, task_runs = read_run_details(stack["api"], flow_run.id)
    ingest = next(t for t in task_runs if t.name == "ingest")
    assert ingest.state.is_failed() and ingest.run_count == 1  # exit code 2: bad input, not retried
    assert "register" not in {t.name for t in task_runs}
    assert len(registered_versions(root)) == before


# --------------------------------------------------------------------------- the run form, queuing, cancel, schedule


@contextlib.contextmanager
def api_client(api: str):
    """A sync Prefect client on the test server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def submit(api: str, deployment: str, parameters: dict):
    """Create a flow run of `deployment` and return at once (the UI's Run button)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return run_deployment(name=deployment, parameters=parameters, timeout=0)


def wait_for_run(api: str, flow_run_id, timeout: float, final: bool = True, log: Path | None = None):
    """Poll until the flow run reaches a final state (or `final=False`: until it runs, or ended)."""
    deadline = time.monotonic() + timeout
    with api_client(api) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final() or (not final and run.state.is_running()):
                return run
            time.sleep(1)
    raise AssertionError(
        f"flow run {flow_run_id} still {run.state.name} after {timeout} s\n{tail(log) if log else ''}"
    )


def artifacts_of(api: str, flow_run_id) -> dict:
    return {a.key: a for a in read_run_details(api, flow_run_id)[0]}


def test_the_run_form_is_typed_with_choices_bounds_and_descriptions(stack):
    with api_client(stack["api"]) as client:
        schema = client.read_deployment_by_name("lmforge-pipeline/local").parameter_openapi_schema
    props, defs = schema["properties"], schema["definitions"]
    assert props["preset"]["enum"] == ["tiny", "small"] and props["preset"]["default"] == "tiny"
    assert list(props) == ["preset", "steps", "learning_rates", "rlhf", "registry", "overrides"]
    assert all(props[name].get("description") for name in props)
    steps = defs["Steps"]["properties"]
    assert steps["pretrain"]["type"] == "integer" and steps["pretrain"]["minimum"] == 1
    assert defs["RLHFKnobs"]["properties"]["algorithm"]["enum"] == ["ppo", "grpo", "dpo", None]
    assert defs["RegistryKnobs"]["properties"]["dtype"]["enum"] == ["fp32", "bf16", None]
    gate = defs["RegistryKnobs"]["properties"]["min_reward_accuracy"]
    assert (gate["minimum"], gate["maximum"]) == (0, 1) and "accuracy" in gate["description"]
    # The server itself refuses values outside the form (the UI shows the same message).
    for bad in ({"preset": "huge"}, {"steps": {"pretrain": 0}}, {"rlhf": {"algorithm": "reinforce"}}):
        with pytest.raises(Exception, match="(?i)validation|invalid|not valid"):
            submit(stack["api"], "lmforge-pipeline/local", bad)


def test_the_run_form_submits_in_the_browser_untouched_and_with_one_field_changed(stack):
    """Prefect's Custom run page validates the form in the browser before it submits, where an
    empty dropdown is sent as null (issue 23: "None is not one of ['ppo', 'grpo', 'dpo']" kept the
    form from submitting as it opens). Clicked as a person would, in Chromium: the form submitted
    untouched, then with "RLHF steps" set; both runs are created with what the form shows and start
    (then they are cancelled: what they run is other tests' business)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run installs it)")
    api = stack["api"]
    with api_client(api) as client:
        deployment = client.read_deployment_by_name("lmforge-pipeline/local")
        before = {r.id for r in client.read_flow_runs()}
    page_url = f"{api.removesuffix('/api')}/deployments/deployment/{deployment.id}/run"
    rlhf_steps = str(TOY["rlhf.max_steps"])  # the value params.yaml holds: the run re-runs nothing new
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 2200})
        for value in (None, rlhf_steps):
            page.goto(page_url, wait_until="networkidle")
            label = page.locator(".schema-form-property__label", has_text="RLHF steps")
            label.first.wait_for()
            if value is not None:
                field = page.locator(".schema-form-property", has=label).last.locator("input").first
                field.fill(value)
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(re.compile(r"tab=Runs|/flow-runs/"), timeout=30_000)
            assert not page.get_by_text("is not one of").count()
        browser.close()
    with api_client(api) as client:
        runs = sorted((r for r in client.read_flow_runs() if r.id not in before), key=lambda r: r.created)
    assert len(runs) == 2, runs
    untouched, changed = runs

    def leaves(value):
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        return [value]

    set_fields = [leaf for k, v in untouched.parameters.items() if k != "preset" for leaf in leaves(v)]
    assert all(leaf in (None, "") for leaf in set_fields), untouched.parameters
    assert changed.parameters["steps"]["rlhf"] == int(rlhf_steps), changed.parameters
    # Both start (one after the other: the deployment runs one at a time); neither need finish here.
    from prefect.states import Cancelling

    for run in runs:
        started = wait_for_run(api, run.id, RUN_TIMEOUT_S, final=False, log=stack["serve_log"])
        if not started.state.is_final():
            with api_client(api) as client:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
        done = wait_for_run(api, run.id, 120, log=stack["serve_log"])
        assert done.state.is_completed() or done.state.is_cancelled(), done.state


def test_a_typo_in_overrides_fails_before_any_stage(stack):
    root = stack["root"]
    before = (root / "params.yaml").read_bytes()
    run = submit(stack["api"], "lmforge-pipeline/local", {"overrides": {"pretrain.max_stepz": 5}})
    run = wait_for_run(stack["api"], run.id, 60, log=stack["serve_log"])
    assert run.state.is_failed() and "pretrain.max_stepz: unknown key" in run.state.message
    _, task_runs = read_run_details(stack["api"], run.id)
    assert not {t.name for t in task_runs} & set(STAGES)
    assert (root / "params.yaml").read_bytes() == before


def test_a_second_run_waits_for_the_first_and_the_summary_compares_with_the_champion(stack):
    """Two runs submitted together: concurrency limit 1 queues the second; DVC stages never interleave."""
    api, root = stack["api"], stack["root"]
    first = submit(api, "lmforge-pipeline/local", {"steps": {"pretrain": 6}, "learning_rates": {"sft": 1e-3}})
    second = submit(api, "lmforge-pipeline/local", {"registry": {"dtype": "bf16"}})
    runs = [wait_for_run(api, r.id, 2 * RUN_TIMEOUT_S, log=stack["serve_log"]) for r in (first, second)]
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    a, b = sorted(runs, key=lambda r: r.start_time)
    assert a.end_time <= b.start_time  # one at a time
    with api_client(api) as client:
        waited = {s.name for r in runs for s in client.read_flow_run_states(r.id)}
    assert "AwaitingConcurrencySlot" in waited
    stage_times = {
        r.id: [(t.start_time, t.end_time) for t in read_run_details(api, r.id)[1] if t.name in STAGES]
        for r in (a, b)
    }
    assert max(end for _, end in stage_times[a.id]) <= min(start for start, _ in stage_times[b.id])

    # The form's fields landed in params.yaml, as `lmforge run --set` would write them.
    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert raw["pretrain"]["max_steps"] == 6 and raw["sft"]["lr"] == 1e-3
    assert raw["registry"]["dtype"] == "bf16"

    # The first run's summary: its figures beside the champion's of before, the gate decision, links.
    summary = artifacts_of(api, first.id)["lmforge-summary"].data
    assert re.search(r"\*\*Promoted:\*\* `lmforge-chat` v\d+ is now `champion` \(replaces v\d+\)", summary)
    assert "## Key metrics" in summary and "## Gates" in summary and "| `reward_model.accuracy` |" in summary
    assert "/#/models/lmforge-chat/versions/" in summary and "MLflow parent run: [" in summary
    assert "![pretrain loss curve](data:image/png;base64," in summary
    assert (
        "![pretrain loss curve](data:image/png;base64,"
        in artifacts_of(api, first.id)["lmforge-pretrain"].data
    )
    # The other run (dtype only) re-ran just `register`, and compared with the version before it.
    other = artifacts_of(api, (b if a.id == first.id else a).id)
    assert (
        "champion v" in other["lmforge-summary"].data
        and "better on 0, worse on 0" in other["lmforge-summary"].data
    )


def stage_processes(root: Path) -> list:
    """`dvc` and `lmforge` processes working in the project (the served deployments excluded)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["cwd"] == str(root) and ("dvc" in cmd or "lmforge " in cmd or "bin/lmforge" in cmd):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def mlflow_runs(root: Path, filter_string: str) -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/.lmforge/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lmforge")
    return client.search_runs(
        [experiment.experiment_id], filter_string, order_by=["attributes.start_time DESC"]
    )


def test_cancelling_a_run_during_pretrain_stops_the_stage_and_the_next_run_works(stack):
    from prefect.states import Cancelling

    api, root = stack["api"], stack["root"]
    run = submit(api, "lmforge-pipeline/local", {"steps": {"pretrain": 100_000}})

    def training() -> list:
        """This run's pretrain MLflow run once it is open (the stage has started training)."""
        parents = mlflow_runs(root, f"tags.`prefect.flow_run_id` = '{run.id}'")
        if not parents:
            return []
        return mlflow_runs(
            root,
            f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and tags.`lmforge.stage` = 'pretrain'",
        )

    deadline = time.monotonic() + 180
    while not training():
        assert time.monotonic() < deadline, f"pretrain never started\n{tail(stack['serve_log'])}"
        time.sleep(0.5)
    time.sleep(3)  # training steps, not starting up
    assert stage_processes(root)
    with api_client(api) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)  # what the UI's Cancel does
    cancelled_at = time.monotonic()
    while stage_processes(root):
        assert time.monotonic() - cancelled_at < 30, [p.cmdline() for p in stage_processes(root)]
        time.sleep(0.2)
    stopped_s = time.monotonic() - cancelled_at
    run = wait_for_run(api, run.id, 60, log=stack["serve_log"])
    assert run.state.is_cancelled(), run.state
    print(f"cancel -> stage processes gone in {stopped_s:.1f} s")

    # No lock left behind, no half-written outputs, the MLflow runs marked KILLED.
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    if rwlock.exists():
        assert json.loads(rwlock.read_text() or "{}") in ({}, {"read": {}, "write": {}})
    assert not [p for p in (root / "models").rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    [pretrain] = training()
    assert pretrain.info.status == "KILLED", pretrain.info
    parent = mlflow_runs(root, f"tags.`prefect.flow_run_id` = '{run.id}'")[0]
    assert parent.info.status == "KILLED", parent.info

    # The next run works without any cleanup.
    again = submit(api, "lmforge-pipeline/local", {"steps": {"pretrain": 6}})
    again = wait_for_run(api, again.id, RUN_TIMEOUT_S, log=stack["serve_log"])
    assert again.state.is_completed(), again.state
    assert run_cmd([BIN / "dvc", "status"], root).stdout.strip().endswith("up to date.")


def test_a_schedule_on_the_deployment_fires_a_run(stack):
    from datetime import UTC, datetime, timedelta

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.schedules import IntervalSchedule

    api = stack["api"]
    with api_client(api) as client:
        deployment = client.read_deployment_by_name("lmforge-pipeline/local")
        start = datetime.now(UTC) + timedelta(seconds=20)
        [schedule] = client.create_deployment_schedules(
            deployment.id, [(IntervalSchedule(interval=timedelta(hours=1), anchor_date=start), True)]
        )
        try:  # deleting the schedule deletes its runs not started yet: wait for ours first
            deadline = time.monotonic() + 90
            while True:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(),
                )
                fired = [
                    r
                    for r in runs
                    if r.auto_scheduled and r.expected_start_time <= start + timedelta(seconds=1)
                ]
                if fired:
                    break
                assert time.monotonic() < deadline, "the scheduler created no run"
                time.sleep(1)
            run = wait_for_run(api, fired[0].id, RUN_TIMEOUT_S, log=stack["serve_log"])
        finally:
            client.delete_deployment_schedule(deployment.id, schedule.id)
    assert run.state.is_completed(), run.state
    assert abs((run.expected_start_time - start).total_seconds()) < 1


def test_the_serve_flow_serves_the_registered_model_until_cancelled(stack):
    from prefect.states import Cancelling

    api, root = stack["api"], stack["root"]
    alias = read_metrics(root, "register")["alias"]
    port = free_port()
    run = submit(api, "lmforge-serve/local", {"port": port, "alias": alias, "ready_timeout_s": 180})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        with api_client(api) as client:
            state = client.read_flow_run(run.id).state
        assert not state.is_final(), f"{state}\n{tail(stack['serve_log'])}"
        assert time.monotonic() < deadline, f"service not ready\n{tail(stack['serve_log'])}"
        time.sleep(1)
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    # The flow polls /readyz once a second and then records its artifact: give it those seconds.
    deadline = time.monotonic() + 30
    while "lmforge-serve" not in (artifacts := artifacts_of(api, run.id)):
        assert time.monotonic() < deadline, f"no lmforge-serve artifact: {sorted(artifacts)}"
        time.sleep(0.5)
    assert f"@ {alias}" in artifacts["lmforge-serve"].description
    with api_client(api) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    run = wait_for_run(api, run.id, 60, log=stack["serve_log"])
    assert run.state.is_cancelled(), run.state
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/readyz", timeout=2)


# --------------------------------------------------------------------------- params_file


@pytest.fixture
def params_copy(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    return path


def test_apply_overrides_writes_values_and_keeps_comments(params_copy):
    before = params_copy.read_text()
    comments = [line.strip() for line in before.splitlines() if line.strip().startswith("#")]
    changed = apply_overrides(
        params_copy,
        "small",
        {"pretrain.max_steps": 50, "model.n_layer": 2, "registry.gates.min_reward_accuracy": 0.5},
    )
    assert changed["preset"] == {"old": "tiny", "new": "small"}
    assert (
        changed["pretrain.max_steps"]["new"] == 50
        and changed["registry.gates.min_reward_accuracy"]["old"] == 0.7
    )
    after = params_copy.read_text()
    assert all(c in after for c in comments)
    assert "  mode: strict            # strict: bad input stops" in after  # inline comments stay put
    raw = yaml.safe_load(after)
    assert (
        raw["preset"] == "small" and raw["pretrain"] == {"max_steps": 50} and raw["model"] == {"n_layer": 2}
    )
    assert (
        raw["registry"]["gates"]["min_reward_accuracy"] == 0.5
        and raw["registry"]["model_name"] == "lmforge-chat"
    )
    params = load_params(params_copy)
    assert params.preset == "small" and params.pretrain.max_steps == 50 and params.model.n_embd == 768
    # The same values again: nothing changes, the file is not rewritten.
    assert apply_overrides(params_copy, "small", ["pretrain.max_steps=50"]) == {}
    assert params_copy.read_text() == after


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("tiny", {"pretrain.max_stepz": 5}, "pretrain.max_stepz: unknown key"),
        ("tiny", {"pretrain.max_steps": "many"}, "pretrain.max_steps"),
        ("huge", {}, "preset 'huge' is not defined"),
        ("tiny", {"nosuch.key": 1}, "unknown section"),
        ("tiny", {"maxsteps": 1}, "must be section.key"),
    ],
)
def test_apply_overrides_rejects_invalid_values_without_touching_the_file(
    params_copy, preset, overrides, message
):
    before = params_copy.read_bytes()
    with pytest.raises(ParamsError, match=message):
        apply_overrides(params_copy, preset, overrides)
    assert params_copy.read_bytes() == before


def test_cli_run_writes_overrides_before_running(tmp_path):
    root = copy_project(tmp_path / "proj")
    out = run_cmd([BIN / "lmforge", "run", "--set", "pretrain.max_steps=oops"], root, check=False)
    assert out.returncode == 2 and "pretrain.max_steps" in out.stderr
    assert (root / "params.yaml").read_text() == (REPO / "params.yaml").read_text()


# --------------------------------------------------------------------------- registry aliases


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Three registered versions of a dummy model in a temp SQLite store; v1, v2 passed the gates,
    v2 is champion (as the register stage leaves it), v3 is candidate."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    (tmp_path / "model").mkdir()
    for number, gates in ((1, "passed"), (2, "passed"), (3, "failed")):
        version = client.create_model_version(MODEL, source=(tmp_path / "model").as_uri(), run_id=None)
        assert int(version.version) == number
        client.set_model_version_tag(MODEL, str(number), "lmforge.gates", gates)
    client.set_registered_model_alias(MODEL, "champion", "2")
    client.set_registered_model_alias(MODEL, "candidate", "3")
    return client


def champion(client) -> int:
    return int(client.get_model_version_by_alias(MODEL, "champion").version)


def test_promote_and_rollback_move_champion_and_record_tags(registry):
    from lmforge.registry import aliases

    assert aliases.current_version(MODEL, client=registry) == 2
    moved = aliases.promote(MODEL, 3, reason="manual check ok", client=registry)
    assert (moved["version"], moved["previous"], moved["action"]) == (3, 2, "promote")
    assert champion(registry) == 3
    v3, v2 = registry.get_model_version(MODEL, "3").tags, registry.get_model_version(MODEL, "2").tags
    assert v3["lmforge.champion.previous"] == "2" and v3["lmforge.champion.reason"] == "manual check ok"
    assert "lmforge.champion.promoted_at" in v3 and v2["lmforge.champion.replaced_by"] == "3"

    back = aliases.rollback(MODEL, client=registry)  # to the version that held it before
    assert (back["version"], back["previous"], back["action"]) == (2, 3, "rollback")
    assert "lmforge.champion.rolled_back_at" in registry.get_model_version(MODEL, "3").tags
    # v2 was champion by the register stage (no `previous` tag): the next earlier holder is v1.
    assert aliases.rollback_target(MODEL, client=registry) == 1
    assert aliases.rollback(MODEL, client=registry)["version"] == 1
    with pytest.raises(aliases.AliasError, match="no earlier version"):
        aliases.rollback(MODEL, client=registry)
    assert aliases.rollback(MODEL, to_version=3, client=registry)["version"] == 3


def test_alias_errors_are_clear(registry):
    from lmforge.registry import aliases

    with pytest.raises(aliases.AliasError, match="no version 9"):
        aliases.promote(MODEL, 9, client=registry)
    with pytest.raises(aliases.AliasError, match="holds the alias 'stable'"):
        aliases.rollback(MODEL, alias="stable", client=registry)
    assert champion(registry) == 2


def test_cli_promote_and_rollback(registry, capsys):
    from lmforge.cli import main

    assert main(["promote", "--version", "1", "--model-name", MODEL]) == 0
    assert "version 2 -> 1" in capsys.readouterr().out
    assert champion(registry) == 1
    assert main(["rollback", "--model-name", MODEL]) == 0
    assert champion(registry) == 2
    assert main(["promote", "--version", "7", "--model-name", MODEL]) == 2
    assert "no version 7" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a worker on a work pool (issue 26)


def test_a_worker_runs_the_pipeline_on_its_checkout_into_the_team_servers_and_a_clone_pulls_it(
    stack,
    shared,  # noqa: F811
    ssh_remote,  # noqa: F811
    tmp_path,
):
    """Team mode end to end (issue 26). `flows/deployments.py --pool` deploys to a process work pool;
    `prefect worker start`, in another process with its own working directory and its own git + DVC
    checkout (the GPU host's), picks the run up and runs it there; the stages track to the team's
    MLflow server (PostgreSQL behind it). The checkout pushes to the DVC remote over SSH, and a
    `git clone` of it pulls the same bytes, `dvc status` up to date, with the registered version
    visible through the server."""
    from mlflow import MlflowClient

    remote, key = ssh_remote
    host = checkout(tmp_path / "worker-host", remote)
    use_key(host, key)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LMFORGE_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PREFECT_API_URL=stack["api"],
        PREFECT_HOME=str(tmp_path / "prefect-client"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TOKENIZERS_PARALLELISM="false",
    )
    deploy = [sys.executable, REPO / "flows" / "deployments.py", "--pool", "gpu-hosts", "--name", "team"]
    run_cmd([*deploy, "--checkout", host], tmp_path, env=env)

    home = tmp_path / "worker-home"  # the worker's own working directory, not the checkout
    home.mkdir()
    env["MLFLOW_TRACKING_URI"] = shared.tracking_uri
    log = tmp_path / "worker.log"
    with open(log, "w") as fh:
        worker = subprocess.Popen(
            [BIN / "prefect", "worker", "start", "--pool", "gpu-hosts", "--type", "process"],
            cwd=home,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        flow_run = submit(stack["api"], "lmforge-pipeline/team", {"preset": "tiny", "overrides": TOY})
        done = wait_for_run(stack["api"], flow_run.id, RUN_TIMEOUT_S + 120, log=log)
        assert done.state.is_completed(), f"{done.state}\n{tail(log)}"
    finally:
        stop(worker)
    assert done.work_pool_name == "gpu-hosts"
    assert (host / "models" / "rlhf" / "model.safetensors").is_file()  # ran in the worker's checkout
    assert not (host / ".lmforge" / "mlflow").exists()  # tracked on the team's server, not locally
    client = MlflowClient(tracking_uri=shared.tracking_uri, registry_uri=shared.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert {r.data.tags.get("lmforge.stage") for r in runs} >= set(STAGES)

    push_pull_and_compare(host, tmp_path / "colleague", key, env, shared.tracking_uri)
