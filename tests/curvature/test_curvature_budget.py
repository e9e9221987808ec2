"""The report's time budget and its progress bar over every phase, with fake
clocks: no test times anything real.

The planner is checked against an independent brute force (every common scale factor on a fine grid), the
cost model against counts made by hand, and the report against its own plan."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from builders import tiny_bert, token_dataset

import hf_msam
from hf_msam.curvature import budget, report as report_module
from hf_msam.curvature.budget import (
    FLOORS,
    ReportCosts,
    ReportProgress,
    ReportSizes,
    default_max_seconds,
    estimate,
    plan_report,
)
from hf_msam.curvature.gram import plan_gram

REQUEST = ReportSizes(num_examples=256, lanczos_iterations=30, trace_probes=20, coherence_examples=256,
                      probe_steps=30, m_sharpness=True, probe_batch_size=32)
# unit costs of the size of a sentence-embedding model on a CPU (all-MiniLM-L6-v2, 256 examples)
COSTS = ReportCosts(hvp=27 / 256, gradient=9 / 256, coherence_row=0.15, coherence_rows_per_example=1,
                    coherence_dim=11_000_000, gram_flops_per_second=20e9, coherence_memory_gb=2.0)


def test_default_budget():
    assert default_max_seconds("cpu") == 600
    assert default_max_seconds("cpu", training_seconds=180) == 180  # about the training time
    assert default_max_seconds("cpu", training_seconds=20) == 120
    assert default_max_seconds("cpu", training_seconds=5000) == 600
    assert default_max_seconds("cuda", training_seconds=20) == 1800


def test_estimate_counts_each_measure():
    seconds = estimate(REQUEST, COSTS)
    assert seconds["gradient"] == pytest.approx(9)
    assert seconds["eigenvalues"] == pytest.approx(27 * 30)
    assert seconds["trace"] == pytest.approx(27 * 20)
    assert seconds["m_sharpness"] == pytest.approx(1.5 * 9)
    assert seconds["probe"] == pytest.approx(27 * 32 / 256 * 30)
    gram = plan_gram(256, 1, 11_000_000, 2.0)
    resident = gram.resident_examples
    evaluations = 256 + sum(256 - end for end in range(resident, 256, resident))  # each later example per pass
    pairs = sum(min(resident, 256 - a) * (256 - a) for a in range(0, 256, resident))
    assert seconds["coherence"] == pytest.approx(evaluations * 0.15 + 2 * pairs * 11_000_000 / 20e9)
    assert seconds["adam"] == 0  # not requested
    assert estimate(replace(REQUEST, adam_iterations=12), COSTS)["adam"] == pytest.approx(27 * 12)
    assert estimate(ReportSizes(256, 0, 0, 0, 0, False, 32), COSTS) == {
        "gradient": pytest.approx(9), "eigenvalues": 0, "trace": 0, "m_sharpness": 0, "coherence": 0, "probe": 0,
        "adam": 0}


def test_request_that_fits_is_kept():
    plan = plan_report(REQUEST, COSTS, max_seconds=math.inf)
    assert plan.sizes == REQUEST and plan.cuts == [] and plan.fits and plan.factor == 1.0
    assert plan.total_seconds == pytest.approx(sum(estimate(REQUEST, COSTS).values()))


@pytest.mark.parametrize("max_seconds", [600, 180, 1200])
def test_plan_fits_the_budget_with_the_largest_common_factor(max_seconds):
    plan = plan_report(REQUEST, COSTS, max_seconds)
    assert plan.fits and plan.total_seconds <= max_seconds
    assert sum(estimate(REQUEST, COSTS).values()) > max_seconds  # the request did not fit: something was cut
    assert plan.cuts and all(f"{name} {getattr(REQUEST, name)} -> {getattr(plan.sizes, name)}" in plan.cuts
                             for name in FLOORS if getattr(plan.sizes, name) != getattr(REQUEST, name))
    for name, floor in FLOORS.items():
        assert min(floor, getattr(REQUEST, name)) <= getattr(plan.sizes, name) <= getattr(REQUEST, name)
    # brute force: no common factor on a fine grid above the chosen one fits
    grid = [plan.factor + k * 1e-3 for k in range(1, 1000) if plan.factor + k * 1e-3 <= 1]
    for factor in grid:
        sizes = {name: max(min(getattr(REQUEST, name), FLOORS[name]), math.ceil(getattr(REQUEST, name) * factor))
                 for name in FLOORS}
        candidate = ReportSizes(**sizes, m_sharpness=True, probe_batch_size=32)
        if candidate != plan.sizes:
            assert sum(estimate(candidate, COSTS).values()) > max_seconds
            break


def test_floors_that_do_not_fit_are_said():
    plan = plan_report(REQUEST, COSTS, max_seconds=5)
    assert not plan.fits
    assert plan.sizes == ReportSizes(32, 10, 4, 32, 10, True, 32)
    assert "does not fit" in plan.describe()


def test_plan_line_names_sizes_estimate_and_cuts():
    line = plan_report(REQUEST, COSTS, max_seconds=600).describe()
    assert line.startswith("sharpness report plan: ") and "estimated" in line and "budget 10 min 00 s" in line
    assert "cut to fit: num_examples 256 -> " in line


class ManualClock:
    """A clock the test sets."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_wall_time_and_ends_at_zero_left():
    clock = ManualClock()
    progress = ReportProgress({"gradient": 2.0, "eigenvalues": 8.0, "coherence": 10.0}, enabled=False, clock=clock)
    assert progress.left == pytest.approx(20)  # nothing measured yet: the plan
    progress.start("gradient", 1)
    clock.now = 2.0
    progress.finish()  # as planned
    assert (progress.elapsed, progress.left) == (pytest.approx(2), pytest.approx(18))
    progress.start("eigenvalues", 4)
    clock.now = 4.0
    progress.step()
    clock.now = 5.0
    progress.finish()  # Lanczos converged after one iteration, faster than planned: the rest is sped up too
    assert progress.elapsed == pytest.approx(5)
    assert progress.left == pytest.approx(10 * 5 / 10)
    assert progress.bar.postfix == "eigenvalues 1/4, about 5 s left"
    progress.close()
    assert progress.left == 0


def test_progress_time_left_follows_a_phase_three_times_slower_than_planned():
    """The default text run's bar said 5 minutes left with 20 to go: the coherence phase ran slower than its plan
    and the bar counted down the plan. Now the time left is what the phase's own pace predicts."""
    clock = ManualClock()
    progress = ReportProgress({"gradient": 2.0, "eigenvalues": 8.0, "coherence": 10.0, "probe": 4.0}, enabled=False,
                              clock=clock)
    progress.start("gradient", 1)
    clock.now = 2.0
    progress.finish()
    progress.start("eigenvalues", 4)
    clock.now = 10.0
    progress.finish()
    progress.start("coherence", 5)  # planned 2 s per unit, takes 6
    for done in (1, 2):
        clock.now += 6.0
        progress.step(done)
    # coherence: 3 units at 6 s; probe: its plan times (22 s spent / 14 s of plan done)
    assert progress.left == pytest.approx(3 * 6 + 4 * 22 / 14)
    assert progress.elapsed == pytest.approx(22)
    progress.close()


class FakeClock:
    """Every call advances one second: every timed interval of the planner is 1 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


SMALL = dict(num_examples=16, lanczos_iterations=6, top_k=1, trace_probes=4, batch_size=8, m=4, probe_steps=6,
             coherence_examples=16, learning_rate=0.1, train_batch_size=4)
TINY_FLOORS = {"num_examples": 8, "lanczos_iterations": 3, "trace_probes": 2, "coherence_examples": 8,
               "probe_steps": 3, "adam_iterations": 3}  # fmt: skip


@pytest.fixture
def tiny_floors(monkeypatch):
    """Floors scaled to the tiny reports of these tests (the planner reads ``budget.FLOORS`` when called)."""
    monkeypatch.setattr(budget, "FLOORS", TINY_FLOORS)


def _report(max_seconds, capsys=None, **kwargs):
    return hf_msam.sharpness_report(tiny_bert(2, seed=3), token_dataset(24, 6, 2, seed=4), max_seconds=max_seconds,
                                    clock=FakeClock(), **{**SMALL, **kwargs})


@pytest.mark.usefixtures("tiny_floors")
def test_report_follows_its_plan_under_a_fake_clock(capsys):
    """1 s per timed interval: an HVP costs 1/8 s per example, a coherence row 1 s; 30 s forces cuts."""
    full = _report(math.inf)
    assert full.budget_cuts == [] and full.num_examples == 16 and full.lanczos_iterations <= 6
    cut = _report(30.0, progress=True)
    err = capsys.readouterr().err
    assert "sharpness report plan: " in err and "cut to fit" in err
    assert cut.budget_seconds == 30 and cut.estimated_seconds <= 30 and cut.budget_cuts
    planned = {entry.split()[0]: int(entry.split()[-1]) for entry in cut.budget_cuts}
    assert cut.num_examples == planned.get("num_examples", 16) < 16
    assert cut.coherence_examples == planned["coherence_examples"] < 16
    assert cut.trace_probes == planned.get("trace_probes", 4)
    assert cut.lanczos_iterations <= planned.get("lanczos_iterations", 6)
    assert cut.probe_steps == planned.get("probe_steps", 6)
    assert cut.errors == [] and cut.coherence is not None


@pytest.mark.usefixtures("tiny_floors")
def test_cut_report_is_the_report_of_the_cut_request():
    """What the plan keeps is computed exactly as if it had been asked for."""
    cut = _report(30.0)
    planned = {entry.split()[0]: int(entry.split()[-1]) for entry in cut.budget_cuts}
    asked = _report(math.inf, **{name: planned.get(name, SMALL[name]) for name in
                                 ("num_examples", "lanczos_iterations", "trace_probes", "coherence_examples",
                                  "probe_steps")})
    assert asked.budget_cuts == []
    for key in ("loss", "lambda_max", "trace", "coherence", "m_sharpness", "probe_growth_rate"):
        assert getattr(cut, key) == pytest.approx(getattr(asked, key), rel=1e-6), key


@pytest.mark.usefixtures("tiny_floors")
def test_report_bar_moves_during_coherence_and_ends_full(monkeypatch):
    """The bar advances with each coherence row evaluation, not only at the end of the phase."""
    positions: list[tuple[str, float]] = []
    original = ReportProgress.step

    def spy(self, done=None):
        original(self, done)
        positions.append((self.name, self.bar.n))

    monkeypatch.setattr(budget.ReportProgress, "step", spy)
    bars = []
    monkeypatch.setattr(report_module, "ReportProgress",
                        lambda seconds, enabled, clock: bars.append(ReportProgress(seconds, enabled, clock)) or bars[-1])
    _report(math.inf, progress=True)
    coherence = [n for name, n in positions if name == "coherence"]
    assert len(coherence) >= 16 and all(b > a for a, b in zip(coherence, coherence[1:]))
    phases = [name for name, _ in positions]
    assert {"eigenvalues", "trace", "coherence", "probe"} <= set(phases)
    assert bars[0].bar.n == pytest.approx(bars[0].bar.total)


def test_bad_budget_is_refused_up_front():
    with pytest.raises(ValueError, match="max_seconds"):
        _report(0.0)


def test_option_is_validated_and_reaches_the_report(tmp_path):
    from hf_msam.curvature.arguments import SharpnessArguments, report_options

    for bad in (0, -1.0, "600", True):
        with pytest.raises(ValueError, match="sharpness_max_seconds"):
            SharpnessArguments(sharpness_max_seconds=bad)
    options = SharpnessArguments(sharpness_max_seconds=math.inf)
    assert report_options(options)["max_seconds"] == math.inf
    assert report_options(SharpnessArguments(), training_seconds=42.0)["training_seconds"] == 42.0


def test_hook_budget_follows_the_training_time(tmp_path):
    """A stock Trainer run of a few seconds gets the 2-minute floor of the CPU default; an explicit budget wins."""
    from transformers import Trainer, TrainingArguments

    from hf_msam import SharpnessCallback
    from hf_msam.curvature.hook import training_seconds

    assert training_seconds([{"loss": 1.0}, {"train_runtime": 12.5, "train_loss": 0.3}]) == 12.5
    assert training_seconds([{"loss": 1.0}]) is None
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.1,
                             optim="sgd", report_to="none", save_strategy="no", use_cpu=True)
    for overrides, expected in (({}, 120.0), ({"max_seconds": 5000.0}, 5000.0)):
        callback = SharpnessCallback(num_examples=8, measures=["eigenvalues"], lanczos_iterations=2, top_k=1,
                                     **overrides)
        trainer = Trainer(model=tiny_bert(2, seed=5), args=args, train_dataset=token_dataset(16, seed=6),
                          callbacks=[callback])
        trainer.train()
        assert callback.result.report.budget_seconds == expected


def test_cli_takes_max_seconds(tmp_path):
    from builders import save_text_classifier, write_review_csv

    from hf_msam.curvature.cli import main

    folder = tmp_path / "model"
    save_text_classifier(folder)
    data = tmp_path / "reviews.csv"
    write_review_csv(data, ["0", "1"], rows=6)
    output = tmp_path / "report.json"
    common = [str(folder), "--data", str(data), "--text_column", "review", "--label_column", "sentiment",
              "--output", str(output), "--num_examples", "6", "--measures", "eigenvalues", "--lanczos_iterations",
              "2", "--top_k", "1", "--quiet"]
    assert main([*common, "--max_seconds", "900"]) == 0
    import json

    assert json.loads(output.read_text())["budget_seconds"] == 900
    assert main([*common, "--max_seconds", "0"]) == 2


# --- the coherence of a C-class head -------------------------------------------------------------------------------

# the default text run (5 classes: 4 rows per example, ~13M columns kept, 2 GB of row buffers)
FIVE_CLASS = ReportCosts(hvp=0.07, gradient=0.03, coherence_row=0.25, coherence_rows_per_example=4,
                         coherence_dim=13_000_000, gram_flops_per_second=20e9, coherence_memory_gb=2.0)


def test_exact_estimate_counts_the_recomputed_examples_of_a_five_class_head():
    """151 examples, 8 resident: 1,501 evaluations, not 151: the cost the planner must see."""
    sizes = replace(REQUEST, coherence_examples=151)
    seconds = estimate(sizes, FIVE_CLASS)["coherence"]
    passes = range(0, 151, 8)
    evaluations = 151 + sum(151 - (a + 8) for a in passes if a + 8 < 151)
    pairs = sum(min(8, 151 - a) * (151 - a) for a in passes)
    assert evaluations == 1501
    assert seconds == pytest.approx(1501 * 0.25 + 2 * pairs * 16 * 13_000_000 / 20e9)


def test_sketched_estimate_evaluates_each_example_once():
    costs = replace(FIVE_CLASS, coherence_sketch="auto", coherence_sketch_row=0.12)
    seconds = estimate(REQUEST, costs)["coherence"]  # 256 coherence examples
    k = 2**18
    flops = 2 * 256 * 16 * 13_000_000 + 2 * (256 * 4) ** 2 * k
    assert seconds == pytest.approx(256 * (0.25 + 0.12) + flops / 20e9)
    exact = estimate(REQUEST, FIVE_CLASS)["coherence"]
    assert exact > 5 * seconds
    # within 7 minutes the sketched plan keeps every coherence example, the exact plan cannot
    sketched_plan = plan_report(replace(REQUEST, num_examples=64, lanczos_iterations=16, trace_probes=8,
                                        probe_batch_size=16), costs, 420)
    exact_plan = plan_report(replace(REQUEST, num_examples=64, lanczos_iterations=16, trace_probes=8,
                                     probe_batch_size=16), FIVE_CLASS, 420)
    assert sketched_plan.sizes.coherence_examples == 256 and sketched_plan.total_seconds <= 420
    assert exact_plan.sizes.coherence_examples < 256


@pytest.mark.usefixtures("tiny_floors")
def test_report_sketches_when_rows_do_not_stay_resident():
    """Under a fake clock: no row fits the memory, so "auto" sketches; the report gives the dimension and an rms
    error bound, and sigma lies within a few bounds of the exact report's."""
    exact = _report(math.inf, coherence_sketch="exact", coherence_memory_gb=1e-6)
    auto = _report(math.inf, coherence_memory_gb=1e-6)
    fits = _report(math.inf)  # everything resident: auto stays exact
    assert exact.coherence_sketch_dim is None and fits.coherence_sketch_dim is None
    assert fits.coherence == pytest.approx(exact.coherence, rel=1e-6)  # float32 products in another order
    assert auto.coherence_sketch_dim is not None and 0 < auto.coherence_sketch_error < 1
    assert abs(auto.coherence - exact.coherence) <= 3 * auto.coherence_sketch_error * exact.coherence
    fixed = _report(math.inf, coherence_sketch=64)
    assert fixed.coherence_sketch_dim == 64 and fixed.errors == []
    with pytest.raises(ValueError, match="coherence_sketch"):
        _report(math.inf, coherence_sketch="fast")


def test_sketch_option_is_validated_and_reaches_the_report():
    from hf_msam.curvature.arguments import SharpnessArguments, report_options

    for bad in ("fast", "0", "-3"):
        with pytest.raises(ValueError, match="sharpness_coherence_sketch"):
            SharpnessArguments(sharpness_coherence_sketch=bad)
    assert report_options(SharpnessArguments(sharpness_coherence_sketch="262144"))["coherence_sketch"] == "262144"
    assert "coherence_sketch" not in report_options(SharpnessArguments())
