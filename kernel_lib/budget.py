"""The session's time budget: one object created when the kernel starts, passed down to `fit`.

A Kaggle session ends at a hard limit, so the time that counts starts with the kernel, not with
an import or with `fit`. A training notebook's bootstrap cell creates the budget
(``budget = ks.start_session()``, i.e. `SessionBudget.start`) and passes it to ``ks.train``;
`fit` called without one (tests, benchmarks) starts its own.

Owns `SessionBudget`: the start time read from an injectable clock, the limit ``budget_s``
(0: none), the measured costs of this machine (slowest recent optimizer step, slowest checkpoint
save, inference seconds per image) and the decision whether some work still fits (`exceeded`,
`out_of_time`). Nothing here reads a config or touches a model.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable


class SessionBudget:
    """Decides from measured durations whether the work before the next stop point still fits."""

    def __init__(self, started_at: float, clock: Callable[[], float] = time.monotonic, budget_s: float = 0.0):
        self.started_at, self.clock, self.budget_s = started_at, clock, budget_s
        self.step_s: deque[float] = deque(maxlen=50)
        self.save_s = 0.0
        self.infer_s_per_image: float | None = None

    @classmethod
    def start(cls, budget_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> "SessionBudget":
        """A budget counting from this call (the kernel's start, in a notebook's bootstrap cell)."""
        return cls(clock(), clock, budget_s)

    # -------------------------------------------------------- time
    def elapsed(self) -> float:
        """Seconds since the budget's creation."""
        return self.clock() - self.started_at

    def remaining(self) -> float:
        """Seconds left before the limit (inf without one)."""
        return self.budget_s - self.elapsed() if self.budget_s > 0 else float("inf")

    # -------------------------------------------------------- measured costs
    def record_step(self, seconds: float) -> None:
        self.step_s.append(seconds)

    def record_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def record_inference(self, seconds: float, n_images: int) -> None:
        if n_images:
            self.infer_s_per_image = seconds / n_images

    def step_estimate(self) -> float:
        # The slowest recent step, not the mean: overrunning the hard limit loses the chunk.
        return max(self.step_s, default=0.0)

    def inference_estimate(self, n_images: int) -> float:
        """Seconds to run the model over ``n_images`` images (0 before anything was measured)."""
        return (self.infer_s_per_image or 0.0) * n_images

    # -------------------------------------------------------- decisions
    def exceeded(self, work_s: float) -> bool:
        """True if ``work_s`` seconds more, then a save, would end after the budget."""
        return self.budget_s > 0 and self.elapsed() + work_s + self.save_s > self.budget_s

    def out_of_time(self, work_s: float, remaining_training_s: float, inference_s: float,
                    ends_training: bool) -> bool:
        """Whether to stop before ``work_s`` seconds of training work.

        The caller's post-training inference (``inference_s``) is reserved only where this chunk
        is going to need it: when the whole remaining training (``remaining_training_s``) plus a
        save plus the inference fits, or when the work may end training (``ends_training``: the
        last validation, or one that may stop early). Otherwise the chunk trains until the work
        plus a save would pass the budget; a later chunk finishes and predicts.
        """
        reserve = ends_training or not self.exceeded(remaining_training_s + inference_s)
        return self.exceeded(work_s + (inference_s if reserve else 0.0))


def start_session(budget_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> SessionBudget:
    """The session's budget, counting from now: call it first thing in a kernel."""
    return SessionBudget.start(budget_s, clock)
