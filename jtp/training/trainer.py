"""Trainer: fit / validate / test a TrainModule on a ModelParallelStrategy's mesh.

The train step is compiled exactly once per fit, ahead of time, with fixed input and output
shardings (parameters and optimizer state keep their plan layout across steps) and donated
state buffers (the update happens in place: the peak holds one copy of the state, not two).
The loop never reads device values except every ``log_every_n_steps`` steps, so the host
dispatches ahead of the devices.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtp.analysis.memory import memory_report, peak_memory_per_device
from jtp.mesh import ModelParallelStrategy, mesh_shape
from jtp.parallel.activations import activation_rules
from jtp.parallel.batch import shard_batch
from jtp.parallel.optimizer import opt_state_shardings
from jtp.parallel.parallelize import parallelize, sharded_init
from jtp.parallel.plan import activation_rules_of
from jtp.parallel.replicas import check_replicas
from jtp.training.checkpoint import Checkpointer
from jtp.training.module import TrainModule
from jtp.training.progress import MetricsLogger, ProgressBar, next_run_dir
from jtp.training.signals import stop_on_signals
from jtp.training.steps import PRECISIONS, cast_floats, make_eval_step, make_train_step


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, tree)


def _loader_start(loader: Any, epoch: int) -> int:
    """Select ``epoch`` on the loader; the batch index it will resume from (0 if fresh)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(loader, "state_dict"):
        state = loader.state_dict()
        if state.get("epoch") == epoch:
            return int(state.get("batch", 0))
    return 0


def _version() -> str:
    from jtp import __version__

    return __version__


def _is_global(batch: Any) -> bool:
    return all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch))


class Trainer:
    """Lightning-style trainer for tensor/data/2D-parallel JAX training.

    Args:
      strategy: the mesh layout (default: ``ModelParallelStrategy()``, "auto" sizes).
      max_epochs: epochs to run (stops earlier at ``max_steps``).
      max_steps: optimizer steps to run in total; ``-1`` for no limit.
      gradient_clip_val: clip gradients by their global norm (computed over the whole,
        sharded gradient: identical to clipping the unsharded one).
      accumulate_grad_batches: average gradients over this many batches per optimizer step
        (``optax.MultiSteps``): equal to one step on a batch that many times larger.
      log_every_n_steps: fetch metrics from the devices, log and refresh the progress bar
        every this many batches (the only host syncs in the loop).
      enable_progress_bar: show the progress line (process 0 only).
      logger: ``"csv"``, ``"jsonl"`` or ``None``: per-step metrics under ``log_dir``.
      default_root_dir: runs go to ``<default_root_dir>/version_N``.
      seed: seeds Python's and NumPy's global RNGs for user code; jax randomness is explicit
        (``nnx.Rngs``) and the loaders' order is a function of their own ``seed``.
      track_grad_norm: log the global gradient norm each step. Off by default: on XLA's CPU
        backend the norm's reduction materialises one parameter-sized temporary.
      precision: ``"32-true"``; ``"bf16-mixed"`` (fp32 parameters and optimizer state, bf16
        compute: parameters are cast inside the step, the loss is taken in fp32);
        ``"bf16-true"`` (parameters and optimizer state stored in bf16).
      checkpoint_dir: save sharded, asynchronous, atomic checkpoints here (orbax): every
        ``checkpoint_every_n_steps`` optimizer steps, at the end of ``fit`` and on SIGTERM /
        SIGINT (then exit with 128 + signal); ``keep_last`` complete ones are kept.
      check_replicas: verify with :func:`jtp.check_replicas` that every device of a tensor
        group holds the same rows, for this many first batches of each fit. ``None``: 2 in
        a multi-process run (where a process-dependent loader would go wrong), else 0.
      limit_val_batches: evaluate at most this many batches in ``validate``/``test``.
      report_memory: print the per-device peak memory at the end of ``fit``.
    """

    def __init__(
        self,
        strategy: ModelParallelStrategy | None = None,
        *,
        max_epochs: int = 1,
        max_steps: int = -1,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        log_every_n_steps: int = 10,
        enable_progress_bar: bool = True,
        logger: str | None = "csv",
        default_root_dir: str = "runs",
        seed: int | None = 0,
        track_grad_norm: bool = False,
        precision: str = "32-true",
        checkpoint_dir: str | None = None,
        checkpoint_every_n_steps: int | None = None,
        keep_last: int = 3,
        check_replicas: int | None = None,
        limit_val_batches: int | None = None,
        report_memory: bool = True,
    ):
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches} must be >= 1")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be >= 1")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val={gradient_clip_val} must be > 0 or None")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
        self.precision = precision
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.keep_last = keep_last
        self.check_replicas = check_replicas
        self.first_step = 0  # global step the last fit started from (> 0 after resuming)
        self.strategy = strategy or ModelParallelStrategy()
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.gradient_clip_val = gradient_clip_val
        self.accumulate_grad_batches = accumulate_grad_batches
        self.log_every_n_steps = log_every_n_steps
        self.enable_progress_bar = enable_progress_bar
        self.logger_format = logger
        self.default_root_dir = default_root_dir
        self.seed = seed
        self.track_grad_norm = track_grad_norm
        self.limit_val_batches = limit_val_batches
        self.report_memory = report_memory

        self.global_step = 0  # optimizer steps taken
        self.current_epoch = 0
        self.losses: list[float] = []  # one per training batch of the last fit
        self.metrics_history: list[dict[str, float]] = []
        self.num_compiles = 0  # train-step compiles in this trainer's lifetime
        self.compiled_step: jax.stages.Compiled | None = None
        self.peak_memory_bytes_per_device: int | None = None
        self.log_dir: str | None = None
        self.fit_seconds = self.train_seconds = self.steps_per_second = None
        self.model: nnx.Module | None = None
        self._module: TrainModule | None = None

    # ------------------------------------------------------------------ setup
    @property
    def mesh(self) -> Mesh:
        return self.strategy.mesh

    @property
    def is_global_zero(self) -> bool:
        return jax.process_index() == 0

    def _setup_model(self, module: TrainModule) -> None:
        """Build (once) the sharded model and split it into (graphdef, params, rest)."""
        if self._module is module and self.model is not None:
            return
        if self.seed is not None:
            random.seed(self.seed)
            np.random.seed(self.seed)
        module.mesh, module.trainer = self.mesh, self
        built = module.configure_model(self.mesh)
        rules = module.activation_rules()
        if isinstance(built, tuple):
            target, plan = built
            rules = rules if rules is not None else activation_rules_of(plan)
            fsdp = self.strategy.fsdp
            if isinstance(target, nnx.Module):
                built = parallelize(target, self.mesh, plan, fsdp=fsdp)
            else:
                built = sharded_init(target, self.mesh, plan, fsdp=fsdp)
        if not isinstance(built, nnx.Module):
            raise ValueError(
                "configure_model must return an nnx.Module or (factory, plan), "
                f"got {type(built).__name__}"
            )
        self._install(module, built, rules)

    def _install(self, module: TrainModule, model: nnx.Module, rules: Any) -> None:
        """Adopt a sharded (or abstract, see :mod:`jtp.analysis.abstract`) model for training."""
        self.model, self._module = model, module
        self._activation_rules = rules or {}
        self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        self._replicated = NamedSharding(self.mesh, P())
        self._params = self._committed(self._params)
        self._rest = self._committed(self._rest)
        if self.precision == "bf16-true":
            shardings = _shardings(self._params)
            to_bf16 = jax.jit(partial(cast_floats, dtype=jnp.bfloat16), out_shardings=shardings)
            abstract = any(
                isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self._params)
            )
            cast = jax.eval_shape(to_bf16, self._params) if abstract else to_bf16(self._params)
            self._params = cast

    def _tracing(self) -> Any:
        """Context for tracing steps: the module's activation rules on this mesh."""
        return activation_rules(self.mesh, self._activation_rules)

    def _committed(self, tree: Any) -> Any:
        """Place any leaf that is not yet a mesh array (e.g. an RNG counter) replicated."""

        def place(x: Any) -> Any:
            sharding = getattr(x, "sharding", None)
            if isinstance(x, jax.ShapeDtypeStruct) and sharding is None:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated)
            if isinstance(sharding, NamedSharding) and sharding.mesh == self.mesh:
                return x
            return jax.device_put(x, self._replicated)

        return jax.tree.map(place, tree)

    def _optimizer(self, module: TrainModule) -> optax.GradientTransformation:
        tx = module.configure_optimizers()
        if self.gradient_clip_val is not None:
            tx = optax.chain(optax.clip_by_global_norm(self.gradient_clip_val), tx)
        if self.accumulate_grad_batches > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=self.accumulate_grad_batches)
        return tx

    def _merged(self, params: Any, rest: Any) -> nnx.Module:
        return nnx.merge(self._graphdef, params, rest)

    def _sync_model(self) -> None:
        """Point the user-visible model at the latest state."""
        self.model = self._merged(self._params, self._rest)

    # ------------------------------------------------------------------ steps
    def _make_train_step(self, module: TrainModule, tx: optax.GradientTransformation) -> Callable:
        return make_train_step(
            self._graphdef, _shardings(self._params), module.training_step, tx,
            precision=self.precision, track_grad_norm=self.track_grad_norm,
        )  # fmt: skip

    def _compile_train_step(self, step: Callable, batch: Any) -> jax.stages.Compiled:
        state_sh = (
            _shardings(self._params),
            self._opt_shardings,
            _shardings(self._rest),
        )
        jitted = jax.jit(
            step,
            in_shardings=(*state_sh, _shardings(batch)),
            out_shardings=(*state_sh, self._replicated),
            donate_argnums=(0, 1, 2),
        )
        with self._tracing():
            lowered = jitted.lower(self._params, self._opt_state, self._rest, batch)
        compiled = lowered.compile()
        self.num_compiles += 1
        return compiled

    def _global_batch(self, batch: Any) -> Any:
        return batch if _is_global(batch) else shard_batch(batch, self.mesh)

    # ------------------------------------------------------------------ fit
    def fit(self, module: TrainModule, *, resume: bool = False) -> Trainer:
        """Train ``module`` for ``max_epochs`` (or until ``max_steps`` optimizer steps in
        total); returns the trainer.

        With ``resume=True`` (needs ``checkpoint_dir``) training continues from the newest
        complete checkpoint, if any: parameters, optimizer state, step, epoch and loader
        position; on the same mesh the following losses are bitwise those of an
        uninterrupted run, on another mesh the state is resharded on restore.
        """
        self._setup_model(module)
        tx = self._optimizer(module)
        self._opt_shardings = opt_state_shardings(tx, self._params)
        self._opt_state = jax.jit(tx.init, out_shardings=self._opt_shardings)(self._params)
        step_fn = self._make_train_step(module, tx)
        loader = module.train_dataloader()
        ckpt = (
            Checkpointer(self.checkpoint_dir, keep_last=self.keep_last)
            if self.checkpoint_dir
            else None
        )
        if resume and ckpt is None:
            raise ValueError("fit(resume=True) needs Trainer(checkpoint_dir=...)")
        self.first_step = 0
        if resume and ckpt.latest_step() is not None:
            self._restore(ckpt, loader)
        if self.is_global_zero and self.logger_format:
            self.log_dir = next_run_dir(self.default_root_dir)
        logger = MetricsLogger(self.log_dir, self.logger_format) if self.log_dir else None
        bar = ProgressBar(self.enable_progress_bar and self.is_global_zero)
        self.losses, self.metrics_history = [], []
        compiled, pending = None, []
        k = self.accumulate_grad_batches
        batches_seen, done = self.global_step * k, 0 < self.max_steps <= self.global_step
        t_start = t_compiled = time.perf_counter()
        with stop_on_signals() as stop:
            for epoch in range(self.current_epoch, self.max_epochs):
                if done:
                    break
                self.current_epoch = epoch
                start = _loader_start(loader, epoch)
                bar.start_epoch()
                total = len(loader) if hasattr(loader, "__len__") else None
                n_check = self.check_replicas
                if n_check is None:
                    n_check = 2 if jax.process_count() > 1 else 0
                for i, batch in enumerate(loader, start=start):
                    batch = self._global_batch(batch)
                    if batches_seen - self.first_step * k < n_check:
                        check_replicas(batch, step=self.global_step + 1)
                    if compiled is None:
                        compiled = self._compile_train_step(step_fn, batch)
                        t_compiled = time.perf_counter()
                    try:
                        self._params, self._opt_state, self._rest, metrics = compiled(
                            self._params, self._opt_state, self._rest, batch
                        )
                    except (TypeError, ValueError) as err:
                        raise ValueError(
                            f"batch {i} of epoch {epoch} does not match the compiled train "
                            f"step (shapes/shardings must stay fixed; use drop_last=True): {err}"
                        ) from err
                    batches_seen += 1
                    boundary = batches_seen % k == 0  # an optimizer step just happened
                    self.global_step += int(boundary)
                    pending.append((self.global_step, epoch, metrics))
                    done = 0 < self.max_steps <= self.global_step
                    every = self.checkpoint_every_n_steps
                    stopping = stop.requested  # read once: a signal may land at any moment
                    periodic = bool(every and self.global_step % every == 0)
                    save = ckpt is not None and boundary and (stopping or periodic)
                    if save or done or len(pending) >= self.log_every_n_steps or i + 1 == total:
                        last = self._flush(pending, logger)  # raises on a non-finite loss
                        pending = []
                        bar.update(epoch, i + 1, total, last, self._batch_rows(batch))
                    if save:
                        self._save(ckpt, loader)
                    if stopping and (boundary or ckpt is None):
                        self._flush(pending, logger)
                        bar.close()
                        if ckpt is not None:
                            ckpt.close()
                        raise SystemExit(stop.exit_code)
                    if done:
                        break
            else:
                self.current_epoch = self.max_epochs
        self._flush(pending, logger)
        bar.close()
        if ckpt is not None:
            if self.global_step > 0 and self.global_step not in ckpt.all_steps():
                self._save(ckpt, loader)
            ckpt.close()
        t_end = time.perf_counter()
        self.fit_seconds = t_end - t_start  # everything, compile included
        if compiled is not None:
            # Steady state: from the end of the compile to the last step's metrics on host.
            self.train_seconds = t_end - t_compiled
            self.steps_per_second = (batches_seen - self.first_step * k) / self.train_seconds
        self._sync_model()
        if compiled is not None:
            self.compiled_step = compiled
            self.peak_memory_bytes_per_device = peak_memory_per_device(compiled)
            if self.report_memory and self.is_global_zero:
                print(self.memory_report())
        return self

    def _train_state(self) -> dict[str, Any]:
        return {"params": self._params, "opt_state": self._opt_state, "rest": self._rest}

    def _save(self, ckpt: Checkpointer, loader: Any) -> None:
        """Start an async save of the state after ``global_step`` optimizer steps."""
        loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
        meta = {
            "step": self.global_step,
            "epoch": loader_state["epoch"] if loader_state else self.current_epoch,
            "loader": loader_state,
            "mesh": mesh_shape(self.mesh),
            "fsdp": self.strategy.fsdp,
            "precision": self.precision,
            "jtp_version": _version(),
            "module": self._module.checkpoint_metadata() if self._module else {},
        }
        ckpt.save(self.global_step, self._train_state(), meta)

    def _restore(self, ckpt: Checkpointer, loader: Any) -> None:
        state, meta, step = ckpt.restore(self._train_state())
        self._params, self._opt_state, self._rest = (
            state["params"],
            state["opt_state"],
            state["rest"],
        )
        self.global_step = self.first_step = int(meta["step"])
        self.current_epoch = int(meta["epoch"])
        if meta.get("loader") and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(meta["loader"])
        if self.is_global_zero:
            print(
                f"resumed from step {step} (epoch {self.current_epoch}) saved on mesh "
                f"{meta.get('mesh')}, fsdp={meta.get('fsdp')}; now {mesh_shape(self.mesh)}, "
                f"fsdp={self.strategy.fsdp}",
                file=sys.stderr,
            )

    @staticmethod
    def _batch_rows(batch: Any) -> int:
        leaves = jax.tree.leaves(batch)
        return int(leaves[0].shape[0]) if leaves else 0

    def _flush(self, pending: list, logger: MetricsLogger | None) -> dict[str, float]:
        """Fetch pending step metrics in one transfer; log them; return the latest."""
        if not pending:
            return {}
        fetched = jax.device_get([m for _, _, m in pending])
        rows = []
        for (step, epoch, _), values in zip(pending, fetched, strict=True):
            row = {k: float(v) for k, v in values.items()}
            self.losses.append(row["loss"])
            self.metrics_history.append(row)
            rows.append({"step": step, "epoch": epoch, **row})
        if logger is not None:
            logger.log(rows)
        bad = next((r for r in rows if not np.isfinite(r["loss"])), None)
        if bad is not None:
            where = (
                f" ({self.checkpoint_dir} keeps the last good checkpoint)"
                if self.checkpoint_dir
                else ""
            )
            raise FloatingPointError(
                f"non-finite loss {bad['loss']} at step {bad['step']} (epoch {bad['epoch']}); "
                f"training stopped{where}"
            )
        return {"loss": rows[-1]["loss"]}

    def memory_report(self) -> str:
        """``Peak memory usage: X GB`` per device, as Lightning's example prints it."""
        return memory_report(self.peak_memory_bytes_per_device or 0)

    # ------------------------------------------------------------------ eval
    def _evaluate(self, module: TrainModule, hook: str, loader_hook: str, prefix: str) -> dict:
        self._setup_model(module)
        step = make_eval_step(self._graphdef, getattr(module, hook), precision=self.precision)
        jitted = jax.jit(step, out_shardings=self._replicated)
        totals: dict[str, jax.Array] = {}
        n = 0
        for i, batch in enumerate(getattr(module, loader_hook)()):
            if self.limit_val_batches is not None and i >= self.limit_val_batches:
                break
            with self._tracing():
                out = jitted(self._params, self._rest, self._global_batch(batch))
            totals = out if not totals else jax.tree.map(jnp.add, totals, out)
            n += 1
        if n == 0:
            raise ValueError(f"{loader_hook}() yielded no batches")
        means = {f"{prefix}_{k}": float(v) / n for k, v in jax.device_get(totals).items()}
        if self.is_global_zero and self.enable_progress_bar:
            print(" ".join(f"{k} {v:.4g}" for k, v in means.items()))
        return means

    def validate(self, module: TrainModule) -> dict[str, float]:
        """Mean of ``validation_step`` outputs over ``val_dataloader()`` (keys ``val_*``)."""
        return self._evaluate(module, "validation_step", "val_dataloader", "val")

    def test(self, module: TrainModule) -> dict[str, float]:
        """Mean of ``test_step`` outputs over ``test_dataloader()`` (keys ``test_*``)."""
        return self._evaluate(module, "test_step", "test_dataloader", "test")
