"""Shared test settings. Nothing here changes os.environ: nbval's kernels inherit it, and the
notebooks must run under the same settings as a learner's JupyterLab."""
import matplotlib

matplotlib.use("Agg")  # unit tests draw figures without a display (this process only)


def pytest_collection_modifyitems(items):
    """nbval waits only 5 s (hard-coded) for a cell's output messages after the cell has
    finished; on a busy machine they can arrive later, which fails a correct cell with "Timeout
    of 5 seconds exceeded waiting for output". Give every notebook cell 60 s instead."""
    for item in items:
        if type(item).__name__ == "IPyNbCell":
            item.output_timeout = 60
