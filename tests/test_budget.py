"""The session budget: counted from its creation, and inference reserved only by the chunk that
can finish training. Fake clocks throughout: a step takes 1 s (ticked after the loop timed it, so
a step is refused only once the elapsed time passes the budget), an eval forward 0.25 s per image."""
import pytest
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_loop import FakeClock, TickPerStep, TinyNet, datasets, fresh_model, tiny_cfg  # noqa: E402

from kernel_lib import train as tr  # noqa: E402
from kernel_lib import train_stage as ks  # noqa: E402
from kernel_lib.budget import SessionBudget, start_session  # noqa: E402


def slow_eval_model(clock: FakeClock) -> TinyNet:
    """TinyNet whose eval forwards cost 0.25 fake s per image: the probe (2 passes of 2 images)
    ends at 1.0 s, a validation of the 8 sites takes 2 s, as do the 8 sites to predict."""
    class SlowEval(TinyNet):
        def forward(self, x, cell_type=None):
            if not self.training:
                clock.t += 0.25 * len(x)
            return super().forward(x, cell_type)

    torch.manual_seed(0)
    return SlowEval()


def fit_with_fake_time(out, clock: FakeClock, budget_s: float, **kwargs) -> tuple[tr.FitResult, SessionBudget]:
    budget = SessionBudget.start(clock=clock)
    train_set, val_set = datasets()
    result = tr.fit(tiny_cfg(out, time_budget_s=budget_s, **kwargs.pop("cfg", {})), slow_eval_model(clock),
                    train_set, val_set, callbacks=[TickPerStep(clock)], budget=budget, n_predict=8, **kwargs)
    return result, budget


# ---------------------------------------------------------------- SessionBudget alone

def test_budget_counts_from_its_creation_not_from_an_import():
    clock = FakeClock()
    clock.t = 100.0  # the library was imported long before the kernel started its session
    budget = start_session(10.0, clock)
    clock.t = 103.0
    assert (budget.elapsed(), budget.remaining()) == (3.0, 7.0)
    assert not hasattr(ks, "KERNEL_START")  # no import-time clock left in the notebooks' module
    assert SessionBudget.start(clock=clock).remaining() == float("inf")  # budget_s 0: no limit


def test_exceeded_counts_the_measured_save():
    clock = FakeClock()
    budget = SessionBudget.start(10.0, clock)
    clock.t = 8.0
    assert not budget.exceeded(1.0)
    budget.record_save(1.5)
    assert budget.exceeded(1.0)  # 8 + 1 + 1.5 > 10


def test_inference_is_reserved_only_by_a_chunk_that_can_finish_or_may_end_training():
    clock = FakeClock()
    budget = SessionBudget.start(10.0, clock)
    clock.t = 8.0
    # 50 s of training left: this chunk cannot finish, so it spends its time on steps
    assert not budget.out_of_time(1.0, remaining_training_s=50.0, inference_s=5.0, ends_training=False)
    # ... but work that may end training (the last validation, or early stopping) must leave room
    assert budget.out_of_time(1.0, remaining_training_s=50.0, inference_s=5.0, ends_training=True)
    clock.t = 2.0
    # 3 s of training + 4 s of inference fit in the 8 s left: reserved
    assert not budget.out_of_time(1.0, remaining_training_s=3.0, inference_s=4.0, ends_training=False)
    assert budget.out_of_time(4.5, remaining_training_s=3.0, inference_s=4.0, ends_training=False)


# ---------------------------------------------------------------- in fit

def test_a_chunk_that_cannot_finish_trains_to_its_last_affordable_step(tmp_path):
    # probe to 1.0 s, then step i while 1 + i <= 6.5, the epoch's last one (i = 5) only with its 2 s
    # validation: 5 steps. The 2 s of inference the stage owes after training are not held back
    # (that stopped this chunk after 4 steps): this chunk cannot finish training anyway
    result, _ = fit_with_fake_time(tmp_path / "a", FakeClock(), 6.5)
    assert (result.steps_done, result.stopped_reason) == (5, "time_budget")
    # with TTA the 8 sites cost 8 views each (16 s, more than the whole budget): the same 5 steps
    result, _ = fit_with_fake_time(tmp_path / "b", FakeClock(), 6.5, cfg=dict(tta=True))
    assert (result.steps_done, result.stopped_reason) == (5, "time_budget")


@pytest.mark.slow
def test_the_chunk_that_ends_training_keeps_room_for_inference(tmp_path):
    # training costs 1 (probe) + 12 steps + 2 validations of 2 s = 17 s; with the 2 s of inference
    # 19 s > 17.5 s: the chunk trains all 12 steps (reserving inference in every check stopped it
    # after 11) and stops before the validation that ends training
    out = tmp_path / "run"
    first, _ = fit_with_fake_time(out, FakeClock(), 17.5)
    assert (first.steps_done, first.epochs_done, first.finished, first.stopped_reason) == (
        12, 1, False, "time_budget")
    # the next chunk validates (probe 1 s + 2 s) and finishes with the inference still inside its budget
    second, budget = fit_with_fake_time(out, FakeClock(), 17.5)
    assert (second.steps_done, second.epochs_done, second.finished) == (12, 2, True)
    assert budget.remaining() >= budget.inference_estimate(8) > 0


@pytest.mark.slow
def test_a_chunk_whose_remaining_training_fits_finishes_and_leaves_the_inference_time(tmp_path):
    result, budget = fit_with_fake_time(tmp_path, FakeClock(), 19.5)
    assert (result.steps_done, result.finished) == (12, True)
    assert budget.elapsed() == 17.0 and budget.remaining() >= budget.inference_estimate(8) == 2.0


def test_setup_time_before_fit_counts_against_the_budget(tmp_path):
    clock = FakeClock()
    budget = SessionBudget.start(clock=clock)
    clock.t = 3.0  # data loading and model building in the notebook's earlier cells
    train_set, val_set = datasets()
    result = tr.fit(tiny_cfg(tmp_path, time_budget_s=4.5), fresh_model(), train_set, val_set,
                    callbacks=[TickPerStep(clock)], budget=budget)
    # a fit starting its own budget takes 5 steps in 4.5 s (test_train); 3 s were already spent
    assert (result.steps_done, result.stopped_reason) == (2, "time_budget")


def test_the_notebooks_budget_reaches_fit(tmp_path, monkeypatch):
    seen = {}

    def fake_fit(cfg, model, train_set, val_set, **kwargs):
        seen.update(kwargs)
        return "result"

    monkeypatch.setattr(ks.loop, "fit", fake_fit)
    budget = ks.start_session()
    data = SimpleNamespace(train=[], val=[0] * 3, test=[0] * 5, split_name="experiment", pseudo_labels=None)
    assert ks.train(tiny_cfg(tmp_path), None, data, budget) == "result"
    assert seen == {"n_predict": 8, "budget": budget}
