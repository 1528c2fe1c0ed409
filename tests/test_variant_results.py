"""variant_results: the summaries notebook 10 reads from the variant sweep, on a tiny made-up sweep."""
import pytest

from lora_course.variant_results import (beyond_noise, comparison, load_variant_sweep, lr_curve, mean_loss,
                                         rank_curve, rank_steps_to_loss, runs_at, stat, steps_to_loss,
                                         trajectory_slopes, tuned_rates)


def _run(test, val, loss=1.0, params=10):
    return {"test_accuracy": test, "val_accuracy": [0.1, val], "val_loss": [2.0, loss],
            "train_loss": [2.0, 1.5, 1.0, 0.5], "trainable_parameters": params}


def _sweep():
    grid = {
        # A: the shared rate 0.004 is best on validation; 0.008 has the best test accuracy (never used)
        "A": {"rates": {"0.002": [_run(0.3, 0.3), _run(0.5, 0.3)], "0.004": [_run(0.5, 0.6), _run(0.7, 0.6)],
                        "0.008": [_run(0.9, 0.5), _run(0.9, 0.5)]}},
        # B: a tie on validation accuracy, broken by the lower validation loss
        "B": {"rates": {"0.004": [_run(0.2, 0.4, 1.0), _run(0.2, 0.4, 1.0)],
                        "0.016": [_run(0.6, 0.4, 0.5), _run(0.6, 0.4, 0.5)]}},
    }
    line = {"delta_m": [1.0, 2.0, 3.0, 4.0], "delta_d": [1.0, 2.0, 3.0, 4.0]}  # slope 1
    down = {"delta_m": [4.0, 3.0, 2.0, 1.0], "delta_d": [1.0, 2.0, 3.0, 4.0]}  # slope -1
    data = {"shared_lr": 0.004, "grid": grid,
            "ranks": {"A": {"2": [_run(0.4, 0), _run(0.6, 0)], "1": [_run(0.2, 0), _run(0.2, 0)]}},
            "trajectories": [{"method": "m", "seed": 0, "layers": {"x": line, "y": down}},
                             {"method": "m", "seed": 1, "layers": {"x": line, "y": line}}]}
    data["tuned"] = tuned_rates(data)
    return data


def test_stat_and_the_noise_rule():
    s = stat([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1414, abs=1e-4) and s["n"] == 2
    assert stat([0.3])["std"] == 0.0
    assert beyond_noise({"mean": 0.9, "std": 0.1}, {"mean": 0.5, "std": 0.1})
    assert not beyond_noise({"mean": 0.6, "std": 0.1}, {"mean": 0.5, "std": 0.1})
    with pytest.raises(ValueError):
        stat([])


def test_tuned_rate_uses_validation_only_and_breaks_ties_on_loss():
    assert tuned_rates(_sweep()) == {"A": 0.004, "B": 0.016}


def test_comparison_reports_shared_and_tuned_rates():
    rows = {r["variant"]: r for r in comparison(_sweep())}
    assert rows["A"]["shared"]["mean"] == pytest.approx(0.6) and rows["A"]["tuned"] == rows["A"]["shared"]
    assert rows["B"]["shared"]["mean"] == pytest.approx(0.2) and rows["B"]["tuned"]["mean"] == pytest.approx(0.6)
    assert rows["B"]["tuned_lr"] == 0.016 and rows["B"]["trainable_parameters"] == 10


def test_curves_are_sorted_numerically():
    data = _sweep()
    rates, stats = lr_curve(data, "A")
    assert rates == [0.002, 0.004, 0.008] and [s["mean"] for s in stats] == pytest.approx([0.3, 0.6, 0.5])
    ranks, stats = rank_curve(data, "A")
    assert ranks == [1, 2] and [s["mean"] for s in stats] == pytest.approx([0.2, 0.5])


def test_trajectory_slopes_average_layers_then_seeds():
    result = trajectory_slopes(_sweep())["m"]
    assert [s["slope"] for s in result["per_seed"]] == pytest.approx([0.0, 1.0])
    assert result["slope"]["mean"] == pytest.approx(0.5) and result["min_slope"] == pytest.approx(-1.0)
    assert [s["corr"] for s in result["per_seed"]] == pytest.approx([0.0, 1.0])
    assert result["min_corr"] == pytest.approx(-1.0)


def test_steps_to_loss_and_clear_errors(tmp_path):
    assert steps_to_loss(_sweep(), "A", 0.004, 1.0, window=1) == [3, 3]
    with pytest.raises(KeyError, match="not in this variant's grid"):
        runs_at(_sweep(), "A", 0.5)
    with pytest.raises(KeyError, match="unknown variant"):
        runs_at(_sweep(), "C", 0.004)
    with pytest.raises(FileNotFoundError, match="variant_sweep.py"):
        load_variant_sweep(tmp_path / "missing.json")


def test_rank_steps_and_early_loss():
    ranks, steps = rank_steps_to_loss(_sweep(), "A", 1.0, window=1)
    assert ranks == [1, 2] and steps == [[3, 3], [3, 3]]
    assert rank_steps_to_loss(_sweep(), "A", 0.1, window=1)[1] == [[None, None], [None, None]]  # never reached
    early = mean_loss(_sweep(), "A", 0.004, 0, 2)                  # steps 1-2: losses 2.0 and 1.5
    assert early["mean"] == pytest.approx(1.75) and early["std"] == 0.0 and early["n"] == 2
    assert mean_loss(_sweep(), "A", 0.004, 2, 4)["mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="outside the 4 recorded steps"):
        mean_loss(_sweep(), "A", 0.004, 0, 5)
    with pytest.raises(KeyError, match="the rank sweep has A"):
        rank_curve(_sweep(), "B")


def test_the_stored_sweep_is_complete_and_its_tuned_rates_follow_the_rule():
    data = load_variant_sweep()
    assert data["tuned"] == tuned_rates(data)
    assert set(data["grid"]) == {"LoRA", "rsLoRA", "LoRA+", "DoRA", "PiSSA", "QLoRA", "VeRA"}
    assert all(len(runs) == len(data["seeds"]) for entry in data["grid"].values() for runs in entry["rates"].values())
    assert set(data["ranks"]) == {"LoRA", "rsLoRA"} and {r["method"] for r in data["trajectories"]} == {
        "full FT", "LoRA", "DoRA"}
    assert all(len(run["train_loss"]) == data["steps"] for entry in data["grid"].values()
               for runs in entry["rates"].values() for run in runs)
