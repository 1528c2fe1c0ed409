"""Helpers to drive a real JupyterLab in headless Chromium (Python Playwright, Debian's chromium).

``running_jupyterlab`` starts one throw-away JupyterLab server on localhost over a folder and
always stops it; ``open_lab`` loads Lab once in a page; ``open_notebook`` opens a notebook in it
and waits for a real kernel; ``run_all_cells`` runs it from the menu as a person would;
``notebook_report`` reads back what the page shows (error outputs, images, widgets, text
fallbacks of widgets); ``close_notebooks`` closes the tab and ``shut_down_kernels`` ends every
kernel through the server's REST API, so the next notebook starts with the memory of the last
one freed. The ``*_JS`` strings hold the few JavaScript checks these
need. Nothing here downloads anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


TOKEN = "lora-course-test"

# User settings of the throw-away server (JUPYTERLAB_SETTINGS_DIR/<plugin>.jupyterlab-settings).
LAB_SETTINGS = {
    # Render every cell, not only those in view ("full" and "contentVisibility" skip off-screen
    # cells), so that every output can be counted and every image checked after Run All.
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    # The copies are throw-away; no autosave writes or "file changed on disk" dialogs.
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}


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
    for plugin, settings in LAB_SETTINGS.items():
        path = iso / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(iso / "config"), JUPYTER_RUNTIME_DIR=str(iso / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(iso / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(iso / "workspaces"),
               IPYTHONDIR=str(iso / "ipython"), MPLCONFIGDIR=str(iso / "mpl"))
    env.pop("MPLBACKEND", None)  # the kernel must use its own inline backend, as for a learner
    port = free_port()
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
               "--ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               # window.jupyterapp: to open and close notebooks in one page (no reload of Lab per
               # notebook) and to read each cell's execution state from the notebook model.
               "--LabApp.expose_app_in_browser=True"]
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


def _api(base: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}/api/{path}?token={TOKEN}", method=method)
    with urllib.request.urlopen(request, timeout=30) as reply:
        body = reply.read()
    return json.loads(body) if body else None


def shut_down_kernels(base: str, timeout: float = 30.0) -> None:
    """End every session and its kernel (DELETE /api/sessions/<id>), and wait until none is left."""
    for session in _api(base, "sessions"):
        _api(base, f"sessions/{session['id']}", method="DELETE")
    deadline = time.monotonic() + timeout
    while _api(base, "kernels"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernels still running {timeout:.0f} s after shutdown: {_api(base, 'kernels')}")
        time.sleep(0.3)


# JupyterLab shows an "idle" indicator before any kernel exists ("No Kernel"); running then opens a
# "Select Kernel" dialog. Ready means: a real kernel name AND idle.
KERNEL_READY_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return false;
  const name = panel.querySelector('[data-jp-item-name="kernelName"]')?.innerText.trim();
  const status = panel.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status;
  return !!name && name !== 'No Kernel' && status === 'idle';
}"""

# Every code cell has run: read from the notebook model, not from the prompts (a cell whose input is
# collapsed shows no prompt): each code cell has an execution count and is not running, and the
# kernel is idle. Also done (to fail fast with the reason) when a dialog or a traceback shows up:
# after an error Run All stops, and the later cells never get a count.
ALL_CELLS_RAN_JS = """() => {
  if (document.querySelector('.jp-Dialog')) return true;
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return false;
  const stderr = panel.node.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
  if ([...stderr].some(o => o.textContent.includes('Traceback'))) return true;
  if (panel.sessionContext.session?.kernel?.status !== 'idle') return false;
  const cells = panel.content.widgets.map(c => c.model).filter(m => m.type === 'code');
  return cells.length > 0 && cells.every(m => m.executionCount !== null && m.executionState !== 'running');
}"""

# Execution count of every code cell (null: not run), for the message when Run All times out.
PROMPTS_JS = """() => window.jupyterapp.shell.currentWidget?.content?.widgets.map(c => c.model)
  .filter(m => m.type === 'code').map(m => m.executionCount)"""

# What the notebook shows after Run All. textContent, not innerText: it does not depend on layout.
# Widget-view outputs are found by their renderer (.jupyter-widgets) or, when the widget manager is
# missing, by the text repr JupyterLab falls back to ("interactive(children=(IntSlider(value=4, ...").
REPORT_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const outputs = [...panel.querySelectorAll('.jp-OutputArea-output')];
  const loaded = img => img.complete && img.naturalWidth > 0;
  const cellImages = [...panel.querySelectorAll('.jp-OutputArea .jp-RenderedImage img')]
    .filter(img => !img.closest('.jupyter-widgets'));
  const widgetImages = [...panel.querySelectorAll('.jupyter-widgets img')];
  const fallback = /(interactive|VBox|HBox|IntSlider|FloatProgress)\\((children|value)=/;
  return {
    stderr: outputs.filter(o => o.dataset.mimeType === 'application/vnd.jupyter.stderr')
                   .map(o => o.textContent.slice(0, 3000)),
    cellImages: cellImages.length, cellImagesLoaded: cellImages.filter(loaded).length,
    widgetImages: widgetImages.length, widgetImagesLoaded: widgetImages.filter(loaded).length,
    markdownImagesBroken: [...panel.querySelectorAll('.jp-MarkdownOutput img')].filter(i => !loaded(i))
                            .map(i => i.getAttribute('src')),
    widgetViews: panel.querySelectorAll('.jp-OutputArea-output > .jupyter-widgets').length,
    progressBars: panel.querySelectorAll('.jupyter-widgets .widget-progress').length,
    fallbacks: outputs.filter(o => !o.querySelector('.jupyter-widgets') && fallback.test(o.textContent))
                      .map(o => o.textContent.slice(0, 200)),
  };
}"""


# Counts every widget view JupyterLab draws into an output while the notebook runs, including views
# that are closed again later (a tqdm bar with leave=False disappears when its loop ends). Each
# view is counted once (WeakSet), however often Lumino re-attaches it.
WATCH_WIDGETS_JS = """() => {
  window.__drawnWidgetViews = 0;
  if (window.__widgetObserver) return;            // one observer per page, the count reset per notebook
  const seen = new WeakSet();
  const note = node => {
    if (!(node instanceof Element)) return;
    const views = [...node.querySelectorAll('.jp-OutputArea-output > .jupyter-widgets')];
    if (node.matches('.jp-OutputArea-output > .jupyter-widgets')) views.push(node);
    for (const view of views) if (!seen.has(view)) { seen.add(view); window.__drawnWidgetViews += 1; }
  };
  window.__widgetObserver = new MutationObserver(records => records.forEach(r => r.addedNodes.forEach(note)));
  window.__widgetObserver.observe(document.body, {childList: true, subtree: true});
}"""


# Lab has started when the commands this file fires are registered and the menu bar is drawn.
READY_JS = """() => { const c = window.jupyterapp?.commands;
  return !!c && c.hasCommand('docmanager:open') && c.hasCommand('application:close-all')
    && !!document.querySelector('.lm-MenuBar-itemLabel'); }"""


def open_lab(page, base: str, timeout_ms: int = 90_000) -> None:
    """Load JupyterLab once in ``page``, from an empty workspace (``?reset``)."""
    page.goto(f"{base}/lab?reset&token={TOKEN}")
    page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=timeout_ms)
    page.wait_for_function(READY_JS, timeout=timeout_ms)


# Commands are fired, never awaited inside evaluate (evaluate has no timeout: a command stuck on a
# dialog would hang the test); their outcome lands in window variables that a timed wait reads.
OPEN_JS = """(path) => { window.__labError = null;
  window.jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook'})
    .catch(e => { window.__labError = String(e); }); }"""
OPENED_JS = """(path) => window.__labError || (window.jupyterapp.shell.currentWidget?.context?.path === path)"""
# Save (the copy is throw-away; saving avoids the "unsaved changes" dialog), then close every tab.
CLOSE_ALL_JS = """() => { window.__labError = null;
  const widget = window.jupyterapp.shell.currentWidget;
  const saved = widget?.context ? widget.context.save() : Promise.resolve();
  saved.then(() => window.jupyterapp.commands.execute('application:close-all'))
       .catch(e => { window.__labError = String(e); }); }"""
CLOSED_JS = """() => window.__labError || document.querySelectorAll('.jp-NotebookPanel').length === 0"""


def open_notebook(page, path: str, timeout_ms: int = 60_000) -> None:
    """Open ``path`` (relative to the server root) in the running Lab and wait for a real kernel."""
    page.evaluate(OPEN_JS, path)
    page.wait_for_function(OPENED_JS, arg=path, timeout=timeout_ms)
    error = page.evaluate("() => window.__labError")
    assert not error, f"JupyterLab could not open {path}: {error}"
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell", timeout=timeout_ms)
    page.wait_for_function(KERNEL_READY_JS, timeout=timeout_ms)


def close_notebooks(page, timeout_ms: int = 30_000) -> None:
    page.evaluate(CLOSE_ALL_JS)
    page.wait_for_function(CLOSED_JS, timeout=timeout_ms)
    error = page.evaluate("() => window.__labError")
    assert not error, f"JupyterLab could not close the notebook: {error}"


def run_all_cells(page, timeout_ms: int) -> None:
    """Run > Run All Cells, as a person would (JupyterLab 4 has no default shortcut for it).
    Widget views drawn meanwhile are counted in ``window.__drawnWidgetViews``."""
    page.evaluate(WATCH_WIDGETS_JS)
    page.click('.lm-MenuBar-itemLabel:text-is("Run")')
    page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
    try:
        page.wait_for_function(ALL_CELLS_RAN_JS, timeout=timeout_ms, polling=500)
    except Exception as exc:
        raise AssertionError(f"Run All did not finish within {timeout_ms / 1000:.0f} s; execution count "
                             f"of each code cell (None: not run): {page.evaluate(PROMPTS_JS)}") from exc
    if page.locator(".jp-Dialog").count():
        raise AssertionError(f"a dialog opened instead of running: {page.locator('.jp-Dialog').inner_text()}")


def notebook_report(page) -> dict:
    report = page.evaluate(REPORT_JS)
    report["drawnWidgetViews"] = page.evaluate("() => window.__drawnWidgetViews")
    return report
