"""The `mlflow ui` command the training summary prints serves the run: started as printed (on a free local
port), the run is read back over its REST API, then the server is stopped."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.torchrun import _free_port


def _mlflow_server_missing() -> str | None:
    try:
        import flask  # noqa: F401
        import mlflow.server  # noqa: F401  (mlflow-skinny has no server)
    except ImportError as exc:
        return f"full mlflow with its server is not installed ({exc}); pip install 'hcustom-mc[ui]'"
    if shutil.which("mlflow", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        return "the `mlflow` command is not on PATH"
    return None


@pytest.mark.skipif(_mlflow_server_missing() is not None, reason=str(_mlflow_server_missing()))
def test_printed_mlflow_ui_command_serves_the_run(tmp_path):
    from hcustom_mc.training.tracking import Tracker, mlflow_ui_command, summary_lines

    tracker = Tracker(True, str(tmp_path / "run"), None, "hcustom-mc", "ui-check")
    tracker.log_step(1, 2, "t2v", {"loss": 1.5, "step_time_s": 0.1})
    tracker.log_step(2, 2, "t2v", {"loss": 1.25, "step_time_s": 0.1})
    run_id, uri = tracker.run_id, tracker.tracking_uri
    tracker.finish()
    command = mlflow_ui_command(uri)
    summary = summary_lines({"losses": [1.5, 1.25], "step": 2, "total_steps": 2, "mlflow_run_id": run_id,
                             "tracking_uri": uri, "experiment": "hcustom-mc", "run_dir": str(tmp_path / "run")})
    assert any(line.startswith(f"open it: {command}") for line in summary)
    assert command == f"mlflow ui --backend-store-uri sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"

    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # a file, not a pipe nobody reads (a full pipe stalls the server)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # the printed command, on a free local port, one worker (the default starts several: slow on a loaded host)
    server = subprocess.Popen([*shlex.split(command), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: the server's workers stop with it
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}"
        deadline, body = time.time() + 240, None
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    body = json.loads(response.read())
                break
            except (urllib.error.URLError, OSError):  # not listening yet, or still starting up
                time.sleep(1)
        assert body is not None, f"no answer from {url} (exit {server.poll()}):\n{(tmp_path / 'server.log').read_text()[-3000:]}"
        run = body["run"]
        assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["loss"] == 1.25
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
