# One-command entry points. The first use creates .venv with a Python >= 3.12
# (scripts/find_python.sh; override with PYTHON=/path/to/python3.12).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extras installed into the venv; `make EXTRAS=dev,cuda12 venv` on a GPU machine.
EXTRAS ?= dev

.PHONY: venv train test test-avx2 test-latest test-oracle test-docs constraints lint lint-check bench clean

# constraints.txt: the exact versions the suite passed with, so a fresh clone installs what
# was tested (jax 0.12.1 arrived under `jax>=0.12` and hung two multi-process paths).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { PYBIN=$$(scripts/find_python.sh) && "$$PYBIN" -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

## The Lightning docs' FeedForward 8192x8192 example on 8 forced CPU devices (TP=8).
## On GPUs: make train TRAIN_ARGS=  (all GPUs). Other flags: python -m jtp.train --help.
TRAIN_ARGS ?= --devices 8
train: $(STAMP)
	$(PY) -m jtp.train $(TRAIN_ARGS) $(ARGS)

## The test suite on 8 forced CPU devices, in JOBS worker processes (pytest-xdist; each
## worker forces its own 8 devices). Two workers on two cores take about 3/4 of one's time:
## most of a test is XLA compiling, single-threaded. A file's tests stay on one worker
## (--dist loadfile), so module-level references are computed once. JOBS=0: one process.
JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile $(ARGS)

## The tests whose bounds rest on floating-point rounding (sharded vs unsharded, jtp vs
## transformers' logits, bf16 vs fp32), run again computing as an AVX2 machine does: XLA's
## CPU code generator limited to AVX2 (tests/conftest.py appends its device count to
## XLA_FLAGS, so the two combine). A bound that holds on one instruction set only fails here.
## Why each bound holds: docs/testing.md, "How tolerances are chosen". ~250 s of CPU time.
AVX2_TESTS := \
	'tests/models/test_llama.py::test_matches_unsharded[tp-1x8]' \
	'tests/models/test_llama.py::test_matches_unsharded[tp-sp-1x8]' \
	'tests/models/test_llama.py::test_matches_unsharded[all-2x4]' \
	tests/models/test_llama.py::test_remat_same_numbers \
	tests/models/test_llama.py::test_bf16_mixed_close_to_fp32_and_keeps_fp32_state \
	tests/models/test_hf.py::test_logits_match_transformers \
	tests/models/test_hf.py::test_bf16_load \
	tests/models/test_blockwise.py::test_float32_outputs_and_gradients_equal_xla \
	tests/models/test_blockwise.py::test_bf16_within_bf16_rounding_of_xla \
	tests/models/test_blockwise.py::test_softcap_and_scale_equal_the_xla_einsum_path \
	'tests/parallel/test_parallelize.py::test_matches_unsharded[tiny_lm-1x8-tp]' \
	'tests/parallel/test_parallelize.py::test_matches_unsharded[tiny_lm-2x4-fsdp]' \
	'tests/parallel/test_parallelize.py::test_matches_unsharded[feedforward-2x4-tp]' \
	'tests/parallel/test_parallelize.py::test_matches_unsharded[feedforward-1x8-fsdp]' \
	tests/parallel/test_flax_layers.py::test_mixed_layers_match_unsharded \
	tests/parallel/test_flax_layers.py::test_row_lora_and_conv2d_pairs \
	'tests/parallel/infer/test_infer.py::test_unseen_models_shard_like_a_hand_plan[transformer]' \
	tests/training/test_accumulation.py::test_k_micro_batches_equal_one_step_on_the_whole_batch \
	tests/training/test_trainer.py::test_fit_2x4_matches_one_device_loop \
	tests/training/test_trainer.py::test_clipping_equals_unsharded_clipping \
	tests/training/test_fp8.py::test_linear_gradients_are_within_float8_rounding_of_float32 \
	tests/training/test_trainer.py::test_accumulation_equals_the_larger_batch \
	'tests/checkpoint/test_checkpoint.py::test_resume_onto_another_layout[2x4-fsdp-to-1x8]' \
	tests/models/test_lora.py::test_adapter_logits_match_peft \
	tests/models/test_lora.py::test_sharded_equals_unsharded_logits_and_adapter_grads \
	tests/generation/test_generate.py::test_cache_logits_equal_the_full_forward \
	'tests/generation/test_generate.py::test_greedy_equals_transformers[llama3-1x8]' \
	'tests/generation/test_generate.py::test_greedy_equals_transformers[qwen3-2x4-fsdp]' \
	tests/cli/test_eval.py::test_loss_equals_transformers \
	'tests/models/test_kv_replicas.py::test_training_step_equals_the_unsharded_model[shape0-False-4]' \
	'tests/models/test_hf_moe.py::test_logits_match_transformers[mixtral-2x4-fsdp]' \
	'tests/models/test_hf_moe.py::test_logits_match_transformers[qwen2_moe-4x2-sp-lp]' \
	'tests/parallel/test_experts.py::test_placed_experts_equal_one_device[E-split-2x4-sp]' \
	'tests/parallel/test_experts.py::test_placed_experts_equal_one_device[F-split-2x4]' \
	'tests/parallel/test_moe_expert_parallel.py::test_training_step_equals_one_device[d2e2t2]' \
	'tests/parallel/test_expert_exchange.py::test_padded_exchange_matches_one_device[d2e2t2]'
test-avx2: $(STAMP)
	@if [ "$$(uname -m)" != x86_64 ]; then echo "test-avx2: x86-64 only"; exit 0; fi; \
	echo "XLA_FLAGS=$$XLA_FLAGS --xla_cpu_max_isa=AVX2"; \
	XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=AVX2" $(PY) -m pytest -q -n $(JOBS) --dist loadfile \
	    $(AVX2_TESTS) $(ARGS)

## The multi-process and numerics tests again with the newest releases of jtp's dependencies
## (no constraints) in .venv-latest, when a release newer than constraints.txt's pins exists
## (scripts/newest_releases.py asks pip, installing nothing): a breaking release fails here
## before users install it. FORCE=1 runs them whatever the versions. Passing: `make
## constraints` in .venv-latest's place pins the new versions.
LATEST_TESTS := tests/distributed tests/training/test_multiprocess.py \
	tests/training/test_compilation_cache.py tests/analysis/test_memory.py $(AVX2_TESTS)
test-latest: $(STAMP)
	@if [ -z "$(FORCE)" ] && $(PY) scripts/newest_releases.py constraints.txt; then \
	    echo "test-latest: the newest releases are the pinned ones, tested above"; exit 0; fi; \
	rm -rf .venv-latest && PYBIN=$$(scripts/find_python.sh) && "$$PYBIN" -m venv .venv-latest \
	&& .venv-latest/bin/pip install --quiet --upgrade pip \
	&& .venv-latest/bin/pip install --quiet --upgrade -e ".[dev]" \
	&& .venv-latest/bin/pip install --quiet --upgrade jax jaxlib flax optax orbax-checkpoint \
	&& .venv-latest/bin/pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy) ' \
	&& .venv-latest/bin/python -m pytest -q -n $(JOBS) --dist loadfile $(LATEST_TESTS) $(ARGS)

## Pin what .venv holds now (after a tested upgrade) into constraints.txt.
constraints: $(STAMP)
	@{ echo "# The exact versions the suite passed with (make and CI install these: make venv)."; \
	   echo "# Regenerate after a tested upgrade: make constraints. Newer releases: make test-latest."; \
	   $(PY) -m pip freeze --exclude-editable | grep -v '^jtp'; } > constraints.txt
## The oracle tier: transformers and PEFT run what jtp writes (exports of every supported
## architecture, merged LoRA exports, PEFT adapters; parsed configs field by field). They
## need torch, which jtp's Python (>= 3.12) has no CPU wheel for here: .venv-oracle is a
## Python 3.11 venv with the CPU torch wheel found on disk (about a minute, once), and
## tests/oracle runs in .venv under pytest, calling it through JTP_ORACLE_PYTHON
## (tests/conftest.py leaves tests/oracle out of every run where that is unset). The
## versions are pinned: a new transformers is a deliberate change here, not a CI surprise.
## 46-57 s on two cores, plus ~50 s once for the venv (docs/testing.md).
ORACLE_VENV := .venv-oracle
ORACLE_PY := $(ORACLE_VENV)/bin/python
ORACLE_STAMP := $(ORACLE_VENV)/.installed
ORACLE_PACKAGES := torch==2.13.0 transformers==5.25.0 peft==0.21.2
PYTHON311 ?= python3.11
$(ORACLE_STAMP): Makefile
	@test -x $(ORACLE_PY) || $(PYTHON311) -m venv $(ORACLE_VENV)
	$(ORACLE_PY) -m pip install --quiet $(ORACLE_PACKAGES)
	@touch $(ORACLE_STAMP)

test-oracle: $(STAMP) $(ORACLE_STAMP)
	JTP_ORACLE_PYTHON=$(abspath $(ORACLE_PY)) $(PY) -m pytest -q -p no:xdist tests/oracle $(ARGS)

## The code blocks of README.md and docs/*.md, run as a reader pastes them, page by page in a
## fresh directory (tests/docs/snippets.py: a block that cannot run here says why above it;
## `<!-- run: "A" -> "B" -->` runs it at a small size), after the figures' check: every table
## equals its result and no result is older than the code it measures. ~2 min on two cores.
test-docs: $(STAMP)
	$(PY) -m jtp.bench docs --check
	JTP_DOC_SNIPPETS=1 $(PY) -m pytest -q -n $(JOBS) tests/docs $(ARGS)

## Lint and format in place.
lint: $(STAMP)
	$(PY) -m ruff check --fix jtp tests examples
	$(PY) -m ruff format jtp tests examples

## What CI checks: lint errors only (formatting drift across ruff releases is not a failure).
lint-check: $(STAMP)
	$(PY) -m ruff check jtp tests examples

bench: $(STAMP)
	$(PY) -m jtp.bench $(ARGS)

clean:
	rm -rf $(VENV) .venv-latest $(ORACLE_VENV) .pytest_cache
