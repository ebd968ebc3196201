"""Ready-made training tasks: what ``jtp train`` and ``jtp eval`` run, and what the capacity
planner and the benchmarks compile. Each is a :class:`jtp.TrainModule` a user may also
import and hand to :class:`jtp.Trainer` themselves.

- :mod:`~jtp.recipes.config`: the tasks' configs, one field per ``jtp train`` flag
- :mod:`~jtp.recipes.llama`: :class:`LlamaTask` (presets, Hugging Face checkpoints, LoRA)
  and :func:`~jtp.recipes.llama.resolve`, the one place its model config and plan are
  worked out
- :mod:`~jtp.recipes.feedforward`: :class:`FeedForwardTask`, the Lightning docs' example
- :mod:`~jtp.recipes.perplexity`: :class:`PerplexityTask`, a split of prepared tokens scored
  as ``fit`` validates
"""

from jtp.recipes.config import FeedForwardConfig, LlamaTaskConfig, TaskConfig
from jtp.recipes.feedforward import FeedForwardTask
from jtp.recipes.llama import LlamaSetup, LlamaTask, resolve
from jtp.recipes.perplexity import EvalConfig, PerplexityTask

__all__ = [
    "EvalConfig",
    "FeedForwardConfig",
    "FeedForwardTask",
    "LlamaSetup",
    "LlamaTask",
    "LlamaTaskConfig",
    "PerplexityTask",
    "TaskConfig",
    "resolve",
]
