# The TrainingJob operator: regenerate its schema files, run its tests, benchmark it.
.PHONY: operator-generate operator-unit operator-integration bench-operator

operator-generate:  ## trainer config schema + CRD YAML, from their typed sources
	$(PY) operator/tools/generate.py

operator-unit:
	$(PY) -m pytest -q tests/unit/operator

operator-integration:  ## needs the local control plane binaries (make dev)
	$(PY) -m pytest -q tests/integration/operator

bench-operator:  ## N TrainingJobs vs N MPIJobs applied at once → bench/results/operator.json
	$(PY) bench/operator_bench.py --jobs $(or $(JOBS),100) --repeat $(or $(REPEAT),2) \
		$(if $(JOBS_LARGE),--jobs-large $(JOBS_LARGE),) --out bench/results/operator.json
