"""`make lab` starts JupyterLab on the course, and the server lists every unit's notebook."""

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from autograder.manifest import REPO_ROOT

TOKEN = "course-smoke-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def test_make_lab_serves_the_course_notebooks(course, tmp_path):
    port = free_port()
    venv = Path(sys.executable).parent.parent  # the environment running these tests: .venv under `make test`
    args = (f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --ServerApp.port_retries=0 "
            f"--IdentityProvider.token={TOKEN}" + (" --allow-root" if os.geteuid() == 0 else ""))
    # The command `make lab` runs (STAMP= skips set-up: the environment is the one these tests run in),
    # started here so that this test owns the server's process and can always end it.
    recipe = subprocess.run(["make", "-s", "-n", "lab", "STAMP=", f"VENV={venv}", f"LAB_ARGS={args}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(shlex.split(recipe), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, _ = get(port, "/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, f"jupyter lab exited:\n{(tmp_path / 'lab.log').read_text()}"
                assert time.monotonic() < deadline, f"jupyter lab did not answer:\n{(tmp_path / 'lab.log').read_text()}"
                time.sleep(0.5)
        status, page = get(port, "/lab")
        assert status == 200 and b"JupyterLab" in page
        for unit in course.units:
            _, body = get(port, f"/api/contents/exercises/{unit.dir}")
            listed = {item["name"]: item["type"] for item in json.loads(body)["content"]}
            assert listed.get(f"{unit.dir}.ipynb") == "notebook", f"exercises/{unit.dir}: {sorted(listed)}"
        _, body = get(port, "/api/kernelspecs")
        assert json.loads(body)["default"] == "python3"
    finally:
        server.terminate()  # jupyter shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
