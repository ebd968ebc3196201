"""Trainer: fit / validate / test a TrainModule on a ModelParallelStrategy's mesh.

The train step is compiled exactly once per fit (:mod:`jtp.training.compile`). One call of it
is one optimizer step over ``accumulate_grad_batches`` loader batches. The loop reads device
values only when it logs (or validates), so the host dispatches ahead of the devices; when to
validate, log, save, stop and check replicas is decided in :mod:`jtp.training.policy`, the
same way in every process. The Trainer is the only reader and writer of its fields: the fit
run, checkpoint save/restore and evaluation get what they need as arguments and return
results.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jtp.analysis.memory import memory_report, peak_memory_per_device
from jtp.checkpoint.sharded import Checkpointer
from jtp.distributed import same_programs_on_every_process, watchdog, watching
from jtp.mesh import ModelParallelStrategy, mesh_shape
from jtp.parallel.activations import activation_rules
from jtp.parallel.batch import shard_batch
from jtp.parallel.replicas import check_replicas
from jtp.training.compile import build_state, compile_train_step, persistent_cache_hits, train_step
from jtp.training.evaluate import EvalSteps
from jtp.training.fit_run import FitRun, StepBatches
from jtp.training.loggers import next_run_dir
from jtp.training.module import TrainModule
from jtp.training.options import TrainerOptions
from jtp.training.policy import Policy
from jtp.training.resume import open_checkpoints, restore_train_state, save_train_state
from jtp.training.signals import StopAgreement, stop_on_signals
from jtp.training.state import TrainState


def _is_global(batch: Any) -> bool:
    return all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch))


class Trainer:
    """Lightning-style trainer for tensor/data/2D-parallel JAX training.

    Takes a strategy and the options of :class:`jtp.training.options.TrainerOptions` as
    keyword arguments (``max_epochs``, ``max_steps``, ``accumulate_grad_batches``,
    ``gradient_clip_val``, ``precision``, ``checkpoint_dir``, ...; each documented there).
    """

    def __init__(self, strategy: ModelParallelStrategy | None = None, **options: Any):
        self.options = TrainerOptions(**options)
        self.strategy = strategy or ModelParallelStrategy()
        self.global_step = 0  # optimizer steps taken
        self.current_epoch = 0
        self.first_step = 0  # global step the last fit started from (> 0 after resuming)
        self.losses: list[float] = []  # one per optimizer step of the last fit
        self.metrics_history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []  # {"step", "epoch", "val_*"} per check
        self.num_compiles = 0  # train-step compiles in this trainer's lifetime
        self.compile_seconds = 0.0  # their wall time (a persistent-cache hit: a load)
        self.compile_cache_hits = 0  # of them, loaded from jax's persistent cache, not compiled
        self.compiled_step: jax.stages.Compiled | None = None
        self.peak_memory_bytes_per_device: int | None = None
        self.log_dir: str | None = None
        self.fit_seconds = self.train_seconds = self.steps_per_second = None
        # seconds from the last fit's start to each step's metrics on the host (one per step)
        self.step_times: list[float] = []
        self.model: nnx.Module | None = None
        self._module: TrainModule | None = None
        self._state: TrainState | None = None
        self._rules: dict = {}  # activation rules while steps are traced
        self._train_loader: Any = None
        self._evals: EvalSteps | None = None  # the current module's jitted eval steps

    def __getattr__(self, name: str) -> Any:  # trainer.max_epochs etc. read the options
        options = self.__dict__.get("options")
        if options is not None and hasattr(options, name):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def mesh(self) -> Mesh:
        return self.strategy.mesh

    @property
    def opt_state(self) -> Any:
        """The optimizer state (sharded like the parameters), once ``fit`` has created it."""
        return self._state.opt_state if self._state is not None else None

    @property
    def is_global_zero(self) -> bool:
        return jax.process_index() == 0

    # ------------------------------------------------------------------ setup
    def setup(self, module: TrainModule) -> None:
        """Build (once per module) the sharded model and its state on the strategy's mesh."""
        if self._module is module and self._state is not None:
            return
        if self.options.seed is not None:
            random.seed(self.options.seed)
            np.random.seed(self.options.seed)
        module.trainer = self
        same_programs_on_every_process()  # before anything that crosses processes is traced
        self._state, self._rules = build_state(module, self.strategy, self.options)
        self._module, self._train_loader = module, None
        self.model = self._state.model()  # bf16-true: the bf16 arrays, nothing in fp32
        self._evals = EvalSteps(module, self._state, self.mesh, precision=self.options.precision)

    def _compile(self, step: Any, batches: list[Any]) -> jax.stages.Compiled:
        self.num_compiles += 1
        prec = self.options.precision
        t0 = time.perf_counter()
        with persistent_cache_hits() as hits:
            compiled = compile_train_step(step, self._state, batches, self._rules, precision=prec)
        self.compile_seconds += time.perf_counter() - t0
        self.compile_cache_hits += len(hits)
        return compiled

    # ------------------------------------------------------------------ fit
    def fit(self, module: TrainModule, *, resume: bool | str = False) -> Trainer:
        """Train ``module`` for ``max_epochs`` (or until ``max_steps`` optimizer steps in
        total); returns the trainer.

        With ``resume=True`` (needs ``checkpoint_dir``) training continues from the newest
        checkpoint every process can read: parameters, optimizer state, step, epoch and
        loader position; on the same mesh the following losses are bitwise those of an
        uninterrupted run, on another mesh the state is resharded on restore. The directory
        must exist (a misspelt one is an error, not a fresh start); one without a checkpoint
        yet starts at step 0, saying so. ``resume="if-any"`` also accepts a missing
        directory: the form for a job that restarts itself. Without ``resume``, a
        ``checkpoint_dir`` that holds checkpoints is refused (they belong to an earlier run,
        whose steps this one would mix with).
        """
        o = self.options
        # Refused here, before anything is built: a missing directory, another run's steps.
        ckpt = open_checkpoints(o.checkpoint_dir, resume, keep_last=o.keep_last)
        self.setup(module)
        loader = self._train_loader = module.train_dataloader()
        # After the loader: a schedule may need its length (estimated_stepping_batches).
        step = train_step(module, self._state, o, fsdp=self.strategy.fsdp)
        self.first_step = 0
        if resume and ckpt.all_steps():
            self._resume(ckpt, loader)
        run = self._start_run(ckpt)
        policy = Policy(o, multi_process=jax.process_count() > 1, first_step=self.global_step)
        with stop_on_signals() as signals, run, self._watchdog():
            stopper = StopAgreement(signals, policy.stop_check_every)
            for s in self._step_batches(loader, policy):
                if run.compiled is None:  # a compile is no collective: not watched
                    run.compiled = self._compile(step, s.batches)
                with watching("the train step and what follows it", self.global_step + 1):
                    self._fit_step(run, s, policy, stopper, ckpt, loader)
                if policy.done(self.global_step):
                    break
            if ckpt is not None and self.global_step > self.first_step:
                with watching("the last checkpoint save", self.global_step):
                    self._save(ckpt, loader, only_if_new=True)
        self._finish_fit(run)
        return self

    def _fit_step(self, run, s, policy, stopper, ckpt, loader) -> None:
        """One optimizer step of ``fit`` and what the policy decides after it; each wait on
        other processes is a region of its own, so a hang names what it waited on."""
        step = self.global_step + 1
        self._state.update(*run.train_step(self._state.arrays(), s, step))
        self.global_step = step
        with watching("the stop agreement (an all-gather over processes)", step):
            decision = policy.after_step(
                step,
                stopper,
                len(run.metrics),
                epoch_end=s.index + 1 == s.total,
                epoch_ended=s.epoch_ended,
            )
        if decision.validate:  # the fit's first validation compiles the eval step: untimed
            compiles = not run.metrics.validations
            what = "validation (every process evaluates the same batches)"
            with watchdog.watch(what, step, timed=not compiles):
                means = self._eval_means("validation_step", run.val_loader, "val")
            run.validated(step, s.epoch, means)
        if decision.log:
            with watching("the step's results (loss and metrics, fetched from the devices)", step):
                run.log(s.epoch, s.index + 1, s.total, s.batches)
        if decision.save and ckpt is not None:
            with watching("a checkpoint save", step):
                self._save(ckpt, loader)
        if decision.exit_code is not None:
            run.stop(decision.exit_code)

    @contextlib.contextmanager
    def _watchdog(self) -> Iterator[None]:
        """Arm the collective watchdog for this fit in a multi-process run (one process
        waits on no peer); the previous setting comes back after it."""
        before = watchdog.timeout
        if jax.process_count() > 1:
            watchdog.arm(self.options.collective_timeout)
        try:
            yield
        finally:
            watchdog.arm(before)

    def _start_run(self, ckpt: Checkpointer | None) -> FitRun:
        """This fit's run: a new ``<default_root_dir>/version_N`` on process 0 when logging,
        and the validation loader made before the first step (a bad one fails early)."""
        o = self.options
        logs = self.is_global_zero and o.logger is not None
        if logs:
            self.log_dir = next_run_dir(o.default_root_dir)
        val_loader = self._module.val_dataloader() if o.validates_in_fit else None
        return FitRun(
            o,
            ckpt,
            log_dir=self.log_dir if logs else None,
            val_loader=val_loader,
            show_progress=self.is_global_zero,
        )

    def _step_batches(self, loader: Any, policy: Policy) -> Iterator[StepBatches]:
        """The k global batches of each optimizer step, with where they sit in the epochs.

        Epochs are chained: when an epoch's length is not a multiple of k, its last batches
        and the next epoch's first ones make one step (as ``optax.MultiSteps`` counted them);
        an incomplete group at the very end is not stepped on.
        """
        k, group, ended = self.options.accumulate_grad_batches, [], None
        for epoch in range(self.current_epoch, self.options.max_epochs):
            if policy.done(self.global_step):
                return
            self.current_epoch = epoch
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            total = len(loader) if hasattr(loader, "__len__") else -1
            for index, batch in enumerate(loader, start=_resume_index(loader, epoch)):
                batch = self._global_batch(batch)
                if policy.check_replicas(self.global_step, len(group)):
                    step = self.global_step + 1
                    with watching("check_replicas (an all-gather over processes)", step):
                        check_replicas(batch, step=step)
                group.append(batch)
                if index + 1 == total:
                    ended = epoch
                if len(group) == k:
                    yield StepBatches(epoch, index, total, group, ended)
                    group, ended = [], None
        self.current_epoch = self.options.max_epochs

    def _resume(self, ckpt: Checkpointer, loader: Any) -> None:
        tree, meta = restore_train_state(
            ckpt, self._state.tree(), loader, mesh=self.mesh, fsdp=self.strategy.fsdp
        )
        self._state.update(tree["params"], tree["opt_state"], tree["rest"])
        self.global_step = self.first_step = int(meta["step"])
        self.current_epoch = int(meta["epoch"])

    def _save(self, ckpt: Checkpointer, loader: Any, *, only_if_new: bool = False) -> None:
        """An async save of the state after ``global_step``, with what the run was."""
        o = self.options
        facts = {
            "mesh": mesh_shape(self.mesh),
            "fsdp": self.strategy.fsdp,
            "precision": o.precision,
            "accumulate_grad_batches": o.accumulate_grad_batches,
            "module": self._module.checkpoint_metadata(),
        }
        save_train_state(
            ckpt,
            self._state.tree(),
            loader,
            step=self.global_step,
            epoch=self.current_epoch,
            facts=facts,
            only_if_new=only_if_new,
        )

    def _finish_fit(self, run: FitRun) -> None:
        self.model = self._state.model()
        self.losses, self.metrics_history = run.metrics.losses, run.metrics.history
        self.val_history = run.metrics.validations
        self.fit_seconds, self.train_seconds = run.seconds()
        self.step_times = run.step_times()
        if run.compiled is not None:
            if self.train_seconds:
                self.steps_per_second = (self.global_step - self.first_step) / self.train_seconds
            self.compiled_step = run.compiled
            self.peak_memory_bytes_per_device = peak_memory_per_device(run.compiled)
            if self.options.report_memory and self.is_global_zero:
                print(self.memory_report())

    @property
    def estimated_stepping_batches(self) -> int:
        """Optimizer steps ``fit`` will take, as Lightning's: ``max_steps``, or fewer when
        ``max_epochs`` of the train loader end first (what a LR schedule decays over)."""
        o = self.options
        loader = self._train_loader
        loader = loader if loader is not None else self._module.train_dataloader()
        steps = o.max_epochs * len(loader) // o.accumulate_grad_batches
        return min(steps, o.max_steps) if o.max_steps > 0 else steps

    def memory_report(self) -> str:
        """``Peak memory usage: X GB`` per device, as Lightning's example prints it."""
        return memory_report(self.peak_memory_bytes_per_device or 0)

    # ------------------------------------------------------------------ eval
    def _evaluate(self, module: TrainModule, hook: str, loader_hook: str, prefix: str) -> dict:
        self.setup(module)
        loader = getattr(module, loader_hook)()
        means = self._eval_means(hook, loader, prefix, what=f"{loader_hook}()")
        if self.is_global_zero and self.options.enable_progress_bar:
            print(" ".join(f"{k} {v:.4g}" for k, v in means.items()))
        return means

    def _eval_means(self, hook: str, loader: Any, prefix: str, what: str = "val_dataloader()"):
        """``{prefix_name: mean}`` of the module's ``hook`` over ``loader`` on the current
        parameters (read, never changed)."""
        with activation_rules(self.mesh, self._rules):
            means = self._evals.means(
                hook, loader, self._global_batch, limit=self.options.limit_val_batches, what=what
            )
        return {f"{prefix}_{k}": v for k, v in means.items()}

    def _global_batch(self, batch: Any) -> Any:
        return batch if _is_global(batch) else shard_batch(batch, self.mesh)

    def validate(self, module: TrainModule) -> dict[str, float]:
        """Mean of ``validation_step`` outputs over ``val_dataloader()`` (keys ``val_*``)."""
        return self._evaluate(module, "validation_step", "val_dataloader", "val")

    def test(self, module: TrainModule) -> dict[str, float]:
        """Mean of ``test_step`` outputs over ``test_dataloader()`` (keys ``test_*``)."""
        return self._evaluate(module, "test_step", "test_dataloader", "test")


def _resume_index(loader: Any, epoch: int) -> int:
    """The batch index the loader resumes ``epoch`` from (0 unless restored mid-epoch)."""
    if hasattr(loader, "state_dict"):
        state = loader.state_dict()
        if state.get("epoch") == epoch:
            return int(state.get("batch", 0))
    return 0
