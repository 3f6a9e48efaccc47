# `make demo` and `make test` work on a fresh machine with only Python 3.10+:
# they create .venv, install the CPU build of torch first (pinned), then this package.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install demo reproduce readme test fuzz bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nonsingular reproduce --quick --out runs/reproduce-quick

# the full experiment, 8 seeds, one process per core (models are dealt to the processes)
CORES = $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)))")
reproduce: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(CORES) \
		-m nonsingular reproduce --seeds 8 --out runs/reproduce

# the README's results blocks, generated again from the shipped results.json files
readme: $(STAMP)
	$(PY) -m nonsingular.experiment.report.readme README.md

test: $(STAMP)
	$(PY) -m pytest -q

# the property tests of the bounds' soundness, each round under a fresh hypothesis seed (the
# suite's own runs are derandomized); a failure names its seed: --hypothesis-seed=N repeats it
ROUNDS ?= 10
SOUNDNESS = \
	tests/test_any_model.py::test_ibp_and_crown_are_sound_on_random_graphs \
	tests/test_any_model.py::test_certificates_are_sound_on_random_graphs_with_aliasing_and_switch_points \
	tests/test_any_model.py::test_certificates_are_sound_on_random_graphs_at_the_edges_of_float32 \
	tests/test_any_model.py::test_certificates_are_sound_on_random_graphs_with_linear_maps \
	tests/test_certificates.py::test_every_method_is_sound_on_random_mlps \
	tests/test_certificates.py::test_ibp_and_crown_are_sound_on_random_dense_and_conv_networks \
	tests/test_certificates.py::test_crown_is_sound_for_any_relu_lower_slopes \
	tests/test_certificates.py::test_bab_never_certifies_what_a_perturbation_breaks \
	tests/test_certificates.py::test_every_branch_and_bound_domain_bounds_the_points_inside_it \
	tests/test_certificates.py::test_weight_split_domains_bound_the_points_inside_them \
	tests/test_conv_weight_term.py::test_the_joint_term_is_sound_and_never_looser_than_the_box \
	tests/test_forward_bounds.py::test_crown_is_sound_on_random_residual_networks \
	tests/test_forward_bounds.py::test_crown_is_sound_on_residual_networks_as_they_run \
	tests/test_forward_bounds.py::test_forward_boxes_hold_every_value_the_model_computes \
	tests/test_forward_bounds.py::test_convolutions_transpose_to_their_adjoint \
	tests/test_rounding_extremes.py::test_certificates_hold_for_the_model_as_it_runs_near_both_ends \
	tests/test_lemma.py tests/test_relaxations.py tests/test_pool_norm_bounds.py \
	tests/test_switch_points.py
fuzz: $(STAMP)
	@for i in $$(seq $(ROUNDS)); do \
		seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
		echo "round $$i of $(ROUNDS): --hypothesis-seed=$$seed"; \
		$(PY) -m pytest -q -p no:cacheprovider -x --hypothesis-profile=dev \
			--hypothesis-seed=$$seed $(SOUNDNESS) || { echo "failed under --hypothesis-seed=$$seed"; exit 1; }; \
	done

bench: $(STAMP)
	$(PY) benchmarks/attack_speed.py
	$(PY) benchmarks/certify_speed.py
	$(PY) benchmarks/train_speed.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
