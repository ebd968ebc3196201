"""When the loop validates, logs, saves, stops and checks replicas: one decision per step.

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
    validate: bool  # run validation on the current parameters (then log: val_* join the row)
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

    def validates(self, step: int, epoch_ended: int | None) -> bool:
        """Validate after ``step``: every ``val_check_interval`` steps, and when epoch
        ``epoch_ended`` (ended inside this step) is a ``check_val_every_n_epoch``-th."""
        o = self.options
        interval, every_epochs = o.val_check_interval, o.check_val_every_n_epoch
        on_interval = interval is not None and step % interval == 0
        on_epoch = every_epochs is not None and epoch_ended is not None
        return on_interval or (on_epoch and (epoch_ended + 1) % every_epochs == 0)

    def after_step(
        self,
        step: int,
        stopper: StopAgreement,
        pending: int,
        epoch_end: bool,
        epoch_ended: int | None = None,
    ) -> Decision:
        """What to do now that optimizer step ``step`` has been dispatched (``epoch_ended``:
        the epoch whose last batch this step took, if any)."""
        exit_code = stopper.exit_code(step)
        every = self.options.checkpoint_every_n_steps
        periodic = bool(every and step % every == 0)
        validate = self.validates(step, epoch_ended)
        log = (
            pending >= self.options.log_every_n_steps
            or epoch_end
            or periodic
            or validate
            or exit_code is not None
            or self.done(step)
        )
        save = periodic or exit_code is not None
        return Decision(validate=validate, log=log, save=save, exit_code=exit_code)
