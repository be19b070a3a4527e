# The inference service (serving/): `make serve` runs it on the models named by COUNTER / SEGMENTER,
# `make test-serving` runs its tests, `make bench-serve` writes bench/results/serve.json (extra flags:
# SERVE_BENCH_ARGS="--threads 1 --requests 8").
COUNTER ?= models:/fieldkube-counter@champion
SEGMENTER ?= models:/fieldkube-segmenter@champion

.PHONY: serve test-serving bench-serve bench-serve-gpu

serve:  ## run fieldkube-serve on 127.0.0.1:8080 (MLFLOW_TRACKING_URI must point at the registry)
	$(VENV)/bin/fieldkube-serve --counter "$(COUNTER)" --segmenter "$(SEGMENTER)"

test-serving:  ## the inference service's unit and integration tests
	$(PY) -m pytest tests/unit/serving tests/integration/serving

bench-decode:  ## PNG decode: imagecodecs (libspng) vs Pillow, CPU ms per image and speed-up on every core -> bench/results/decode.json
	$(PY) bench/decode_bench.py --out bench/results/decode.json

bench-serve:  ## load benchmark of the service (concurrency 1/4/16, batching on/off, bare forward)
	$(PY) bench/serve_bench.py --out bench/results/serve.json $(SERVE_BENCH_ARGS)

bench-serve-gpu:  ## on a GPU host: served images/s and p50/p95/p99 vs the bare bf16 forward, default-size models -> bench/results/serve_gpu.json
	$(PY) bench/serve_bench.py --gpu --default-models --out bench/results/serve_gpu.json $(SERVE_BENCH_ARGS)
