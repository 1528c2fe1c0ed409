"""Shared test settings. Nothing here changes os.environ: nbval's kernels inherit it, and the
notebooks must run under the same settings as a learner's JupyterLab."""
import matplotlib

matplotlib.use("Agg")  # unit tests draw figures without a display (this process only)
