"""Helpers to drive a real JupyterLab in headless Chromium (Python Playwright, Debian's chromium).

``find_chromium`` locates a browser (or says how to get one), ``running_jupyterlab`` starts a
throw-away JupyterLab server on localhost over a folder and always stops it, the ``*_JS`` strings
hold the few JavaScript checks the test needs, and ``open_notebook`` and ``run_all_cells`` wait
on them. Nothing here downloads anything:
Playwright drives the installed Chromium through ``executable_path``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOW_TO_GET_CHROMIUM = (
    "the browser test needs Chromium: install it with `sudo apt-get install -y chromium` (Debian/Ubuntu), "
    "or point LORA_COURSE_CHROMIUM at a Chromium/Chrome executable. (`playwright install` is not needed.)"
)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TOKEN = "lora-course-test"


def find_chromium() -> str | None:
    """The Chromium to use: $LORA_COURSE_CHROMIUM, else the first of the usual names on PATH."""
    explicit = os.environ.get("LORA_COURSE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_jupyterlab(root: Path, timeout: float = 60.0):
    """Start ``jupyter lab`` on localhost over ``root`` (its own config, settings, runtime and
    workspace folders, so nothing leaks from or into the user's setup); yield its base URL; stop
    it by its PID in ``finally``, whatever happened."""
    iso = root / ".iso-jupyter"
    for sub in ("config/labconfig", "runtime", "settings", "workspaces", "ipython", "mpl", "data"):
        (iso / sub).mkdir(parents=True, exist_ok=True)
    # No "news" toast over the screenshots.
    (iso / "config/labconfig/page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(iso / "config"), JUPYTER_RUNTIME_DIR=str(iso / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(iso / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(iso / "workspaces"),
               IPYTHONDIR=str(iso / "ipython"), MPLCONFIGDIR=str(iso / "mpl"))
    env.pop("MPLBACKEND", None)  # the kernel must use its own inline backend, as for a learner
    port = free_port()
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
               "--ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    base = f"http://127.0.0.1:{port}"
    with open(iso / "server.log", "wb") as log:  # closed even when Popen itself raises
        server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        yield from _serve(server, base, iso, timeout)


def _serve(server: subprocess.Popen, base: str, iso: Path, timeout: float):
    """Wait until ``server`` answers at ``base``, yield ``base``, and stop the server by its PID
    in ``finally``, whatever happened."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {server.returncode}; see {iso / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s; see {iso / 'server.log'}")
            time.sleep(0.3)
        yield base
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)


# JupyterLab shows an "idle" indicator before any kernel exists ("No Kernel"); running then opens a
# "Select Kernel" dialog. Ready means: a real kernel name AND idle.
KERNEL_READY_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return false;
  const name = panel.querySelector('[data-jp-item-name="kernelName"]')?.innerText.trim();
  const status = panel.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status;
  return !!name && name !== 'No Kernel' && status === 'idle';
}"""

# Every code cell has run: its prompt shows a number ("[12]:"), none shows "[*]:" and the kernel is
# idle. Also done (to fail fast with the reason) when a dialog or an error output shows up.
# textContent, not innerText: cells scrolled out of view are not rendered, so innerText is empty.
ALL_CELLS_RAN_JS = """() => {
  if (document.querySelector('.jp-Dialog')) return true;
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return false;
  const status = panel.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status;
  if (status !== 'idle') return false;
  if (panel.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')) return true;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:?$/.test(p));
}"""

PROMPTS_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]
  .map(p => p.textContent.trim())"""


def open_notebook(page, base: str, name: str, timeout_ms: int = 60_000) -> None:
    page.goto(f"{base}/lab/tree/{name}?token={TOKEN}")
    page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=timeout_ms)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout_ms)
    page.wait_for_function(KERNEL_READY_JS, timeout=timeout_ms)


def run_all_cells(page, timeout_ms: int) -> None:
    """Run > Run All Cells, as a person would (JupyterLab 4 has no default shortcut for it)."""
    page.click('.lm-MenuBar-itemLabel:text-is("Run")')
    page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
    try:
        page.wait_for_function(ALL_CELLS_RAN_JS, timeout=timeout_ms, polling=500)
    except Exception as exc:
        raise AssertionError(f"Run All did not finish; cell prompts: {page.evaluate(PROMPTS_JS)}") from exc
    if page.locator(".jp-Dialog").count():
        raise AssertionError(f"a dialog opened instead of running: {page.locator('.jp-Dialog').inner_text()}")
