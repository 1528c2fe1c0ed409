"""Static pictures of ipywidgets, drawn from the widget state a notebook stores.

A static page has no Python kernel, so a slider on it cannot retrain anything. What it can show
honestly is the widget exactly as the notebook left it: the stored widget state
(``metadata.widgets["application/vnd.jupyter.widget-state+json"]``, written by nbclient when
``scripts/execute_notebooks.py`` runs a notebook) holds every model's final values, the HTML of
every label, the PNG bytes of every ``Image`` and the outputs captured by every ``Output``.

``render_view`` turns one widget view (the ``application/vnd.jupyter.widget-view+json`` output of a
cell) into plain HTML: boxes become flex rows and columns, controls become disabled form elements
set to their stored values, images become ``<img>`` with the stored PNG inline. No JavaScript is
needed and nothing is fetched. A tqdm progress bar (HBox of HTML, FloatProgress, HTML) is drawn
in its final state, e.g. ``full FT: 100% [bar] 120/120 [00:05<00:00, ...]``, never the
``0/120`` of its text fallback.

``is_interactive`` says whether a view holds controls a learner would want to move; the site adds
a note to those views that the live version runs in JupyterLab.

A widget model this file does not know raises ``UnknownWidget`` instead of drawing something
wrong: add a renderer for it here.
"""
from __future__ import annotations

import html
from typing import Callable

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class UnknownWidget(ValueError):
    """A widget model the static renderer cannot draw (or a view without stored state)."""


# Models a learner moves or clicks: a view containing any of them gets the "live in JupyterLab" note.
CONTROLS = {"IntSliderModel", "FloatSliderModel", "FloatLogSliderModel", "IntRangeSliderModel",
            "FloatRangeSliderModel", "SelectionSliderModel", "SelectionRangeSliderModel", "DropdownModel",
            "ToggleButtonsModel", "RadioButtonsModel", "SelectModel", "CheckboxModel", "ToggleButtonModel",
            "TextModel", "IntTextModel", "FloatTextModel", "BoundedIntTextModel", "BoundedFloatTextModel",
            "ButtonModel", "PlayModel"}


def widget_state(notebook) -> dict[str, dict]:
    """model id -> {"model_name": ..., "state": {...}} with binary buffers put back in place."""
    stored = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    models = {}
    for model_id, model in stored.items():
        state = dict(model["state"])
        for buffer in model.get("buffers", []):
            # Only top-level binary fields (Image.value, ...) occur in ipywidgets 8's own models.
            if len(buffer["path"]) != 1 or buffer.get("encoding") != "base64":
                raise UnknownWidget(f"model {model_id}: unsupported buffer {buffer['path']} "
                                    f"({buffer.get('encoding')}); add support in site/static_widgets.py")
            state[buffer["path"][0]] = buffer["data"]
        models[model_id] = {"model_name": model["model_name"], "state": state}
    return models


def _model(models: dict, ref: str) -> dict:
    model_id = ref.removeprefix("IPY_MODEL_")
    if model_id not in models:
        raise UnknownWidget(f"widget model {model_id} has no stored state: re-execute the notebook with "
                            "scripts/execute_notebooks.py, which stores the widget state")
    return models[model_id]


def _descendants(models: dict, ref: str):
    model = _model(models, ref)
    yield model
    for child in model["state"].get("children", []):
        yield from _descendants(models, child)


def is_interactive(models: dict, model_id: str) -> bool:
    return any(m["model_name"] in CONTROLS for m in _descendants(models, model_id))


def _label(state: dict) -> str:
    text = state.get("description", "")
    return f'<span class="sw-label">{html.escape(text)}</span>' if text else ""


def _box(direction: str) -> Callable:
    def render(models, state):
        children = "".join(_render(models, child) for child in state.get("children", []))
        return f'<div class="sw-box sw-{direction}">{children}</div>'
    return render


def _html(models, state):
    # The value is HTML by design (tqdm escapes its own text); it comes from the committed notebook.
    return f'<div class="sw-html">{_label(state)}<span>{state.get("value", "")}</span></div>'


def _text_label(models, state):
    return f'<div class="sw-html">{_label(state)}<span>{html.escape(str(state.get("value", "")))}</span></div>'


def _progress(models, state):
    low, high, value = state.get("min", 0), state.get("max", 100), state.get("value", 0)
    done = 100.0 * (value - low) / (high - low) if high > low else 100.0
    return (f'<div class="sw-progress">{_label(state)}<span class="sw-bar" role="progressbar" '
            f'aria-valuemin="{low}" aria-valuemax="{high}" aria-valuenow="{value}">'
            f'<span class="sw-bar-fill" style="width: {done:.1f}%"></span></span></div>')


def _slider(readout: Callable[[dict], str], position: Callable[[dict], tuple[float, float, float]]):
    def render(models, state):
        low, high, value = position(state)
        done = 100.0 * (value - low) / (high - low) if high > low else 0.0
        return (f'<div class="sw-slider">{_label(state)}<span class="sw-track">'
                f'<span class="sw-handle" style="left: {done:.1f}%"></span></span>'
                f'<span class="sw-readout">{html.escape(readout(state))}</span></div>')
    return render


def _number(state: dict) -> str:
    value = state.get("value")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _selected(state: dict) -> str:
    labels, index = state.get("_options_labels", []), state.get("index")
    return labels[index] if isinstance(index, int) and 0 <= index < len(labels) else ""


def _dropdown(models, state):
    options = "".join(f'<option{" selected" if i == state.get("index") else ""}>{html.escape(label)}</option>'
                      for i, label in enumerate(state.get("_options_labels", [])))
    return f'<div class="sw-dropdown">{_label(state)}<select disabled>{options}</select></div>'


def _toggle_buttons(models, state):
    buttons = "".join(f'<button type="button" disabled class="{"sw-active" if i == state.get("index") else ""}">'
                      f'{html.escape(label)}</button>' for i, label in enumerate(state.get("_options_labels", [])))
    return f'<div class="sw-toggle-buttons">{_label(state)}<span>{buttons}</span></div>'


def _checkbox(models, state):
    checked = " checked" if state.get("value") else ""
    return f'<div class="sw-checkbox"><input type="checkbox" disabled{checked}>{_label(state)}</div>'


def _button(models, state):
    return f'<div class="sw-button"><button type="button" disabled>{html.escape(state.get("description", ""))}</button></div>'


def _image(models, state):
    fmt = state.get("format", "png")
    if fmt not in ("png", "jpeg", "gif", "webp"):
        raise UnknownWidget(f"Image widget of format {fmt!r}; add it in site/static_widgets.py")
    return f'<img class="sw-image" alt="stored widget image" src="data:image/{fmt};base64,{state.get("value", "")}">'


def _output(models, state):
    return f'<div class="sw-output">{"".join(render_output(o) for o in state.get("outputs", []))}</div>'


def render_output(output: dict) -> str:
    """One stored cell output (inside an Output widget) as HTML."""
    kind = output.get("output_type")
    if kind == "stream":
        return f'<pre class="sw-stream">{html.escape(output.get("text", ""))}</pre>'
    if kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        if "image/png" in data:
            return f'<img class="sw-image" alt="stored plot" src="data:image/png;base64,{data["image/png"].strip()}">'
        if "text/html" in data:
            return f'<div class="sw-html">{data["text/html"]}</div>'
        if "text/plain" in data:
            return f'<pre class="sw-stream">{html.escape(data["text/plain"])}</pre>'
    raise UnknownWidget(f"cannot draw an output of type {kind!r} with data {sorted(output.get('data', {}))}")


RENDERERS: dict[str, Callable] = {
    "HBoxModel": _box("row"), "VBoxModel": _box("column"), "BoxModel": _box("column"),
    "HTMLModel": _html, "HTMLMathModel": _html, "LabelModel": _text_label,
    "FloatProgressModel": _progress, "IntProgressModel": _progress,
    "IntSliderModel": _slider(_number, lambda s: (s.get("min", 0), s.get("max", 100), s.get("value", 0))),
    "FloatSliderModel": _slider(_number, lambda s: (s.get("min", 0.0), s.get("max", 100.0), s.get("value", 0.0))),
    "SelectionSliderModel": _slider(_selected, lambda s: (0, max(len(s.get("_options_labels", [])) - 1, 0),
                                                          s.get("index") or 0)),
    "DropdownModel": _dropdown, "SelectModel": _dropdown,
    "ToggleButtonsModel": _toggle_buttons, "RadioButtonsModel": _toggle_buttons,
    "CheckboxModel": _checkbox, "ButtonModel": _button,
    "ImageModel": _image, "OutputModel": _output,
}


def _render(models: dict, ref: str) -> str:
    model = _model(models, ref)
    renderer = RENDERERS.get(model["model_name"])
    if renderer is None:
        raise UnknownWidget(f"no static picture for a {model['model_name']}; add a renderer to "
                            "RENDERERS in site/static_widgets.py")
    return renderer(models, model["state"])


def render_view(models: dict, model_id: str) -> str:
    """The widget view ``model_id`` as static HTML (raises UnknownWidget if it cannot be drawn)."""
    return f'<div class="static-widget">{_render(models, model_id)}</div>'
