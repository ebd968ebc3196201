"""The capacity planner: which (data, tensor) split (and, for a mixture of experts, which
"expert" axis), fsdp, sequence parallelism and remat policy a model needs on a cluster, and
what each costs.

For each valid layout it compiles jtp's real Llama train step *abstractly*
(:mod:`jtp.training.compile`: shapes and shardings only, nothing allocated) for as many
forced CPU devices as the cluster has, and reads per-device memory (``memory_analysis``),
matmul FLOPs by dtype (the traced step) and collective bytes by mesh axis (the HLO). It
compiles the step ``fit`` runs, layers scanned, at the model's whole depth: a scanned step
compiles in the time of one layer, and a shallower one does not predict it
(:mod:`jtp.capacity.measure` says why; ``tests/capacity/test_capacity.py`` checks that the
planner's figures equal the trainer's compiled step, compiled with the CPU's own options).

It sizes the GPU program, not the CPU stand-in: bf16 buffers are counted at 2 bytes, and
the float32 copies of the logits that only the CPU's reductions materialise are not there
(the compile turns those CPU rewrites off: :data:`jtp.capacity.measure.AS_ON_GPU`);
attention is compiled as jtp's O(T) blockwise kernel where a GPU would run cuDNN's fused
one (bf16, supported head dim); and "fits" compares with the memory jax may use, not all
of it (:mod:`jtp.capacity.roofline`). On the one GPU figure recorded the planner is 5.8%
above XLA's compiled peak for the GPU (docs/planning.md).

Times are ESTIMATES from a roofline: matmul FLOPs (read off the traced step, by operand
dtype) at a fraction of the device's peak, plus communication at the link bandwidths
(tensor axis inside a host; data axis across hosts when it spans them), without overlap.
Memory and bytes are compiler figures for XLA's CPU backend; a GPU program fuses and
schedules differently.

Modules: :mod:`~jtp.capacity.planner` (the layouts and :func:`search`),
:mod:`~jtp.capacity.measure` (compile one layout, read its figures),
:mod:`~jtp.capacity.roofline` (the device model), :mod:`~jtp.capacity.report` (the table).
The program is ``jtp capacity`` (``python -m jtp.capacity``).
"""

from jtp.capacity.planner import CapacityTable, Layout, Request, layouts, search
from jtp.capacity.roofline import Hardware

__all__ = ["CapacityTable", "Hardware", "Layout", "Request", "layouts", "search"]
