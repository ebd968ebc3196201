"""When the loop logs, saves, stops and checks replicas: one decision per optimizer step.

Every input to a decision is the same in every process (the step number, the options, the
agreed stop request), so every process takes the same decision at the same step; a decision
one process took alone would leave the others waiting in a collective.
"""

from __future__ import annotations

import dataclasses

from jtp.training.options import TrainerOptions
from jtp.training.signals import StopAgreement


@dataclasses.dataclass(frozen=True)
class Decision:
    log: bool  # fetch pending metrics, log them, refresh the progress bar
    save: bool  # checkpoint this step (when a checkpoint directory is set)
    exit_code: int | None  # leave fit with this code after saving (an agreed stop)


class Policy:
    def __init__(self, options: TrainerOptions, *, multi_process: bool, first_step: int):
        self.options, self.first_step = options, first_step
        every = options.stop_check_every_n_steps
        self.stop_check_every = every or (options.log_every_n_steps if multi_process else 1)
        n = options.check_replicas
        self.replica_batches = (2 if multi_process else 0) if n is None else n

    def done(self, step: int) -> bool:
        """``max_steps`` reached."""
        return 0 < self.options.max_steps <= step

    def check_replicas(self, step: int, in_group: int) -> bool:
        """Hash-check the next batch: it is among the first ``check_replicas`` of this fit."""
        k = self.options.accumulate_grad_batches
        return (step - self.first_step) * k + in_group < self.replica_batches

    def after_step(
        self, step: int, stopper: StopAgreement, pending: int, epoch_end: bool
    ) -> Decision:
        """What to do now that optimizer step ``step`` has been dispatched."""
        exit_code = stopper.exit_code(step)
        every = self.options.checkpoint_every_n_steps
        periodic = bool(every and step % every == 0)
        log = (
            pending >= self.options.log_every_n_steps
            or epoch_end
            or periodic
            or exit_code is not None
            or self.done(step)
        )
        return Decision(log=log, save=periodic or exit_code is not None, exit_code=exit_code)
