# Trainer targets: benchmarks (`make bench-train`, `make bench-layout`, `make bench-loader`, `make bench-accuracy`, `make bench-adapt`,
# `make bench-profile`, `make bench-scale`) and the trainer's own tests. Extra flags for bench-accuracy:
# ACCURACY_BENCH_ARGS="--counter-heads linear clamp relu softplus --seeds 0 1 --no-segmenter".
.PHONY: test-trainer bench-train bench-train-gpu gpu-wheels bench-layout bench-loader bench-accuracy bench-adapt bench-profile bench-scale

test-trainer:  ## unit + integration tests of fieldkube-train / -prepare / -profile / -scale and fieldkube.vision
	$(PY) -m pytest tests/unit/vision tests/unit/trainer tests/integration/trainer

bench-train:  ## images/s of fieldkube-train vs a bare loop, Horovod vs DDP, loader wait -> bench/results/train.json
	$(PY) bench/train_bench.py --out bench/results/train.json

bench-train-gpu:  ## on a GPU host: per model, fieldkube-train vs the bare step, MFU, stall, loader wait -> bench/results/train_gpu.json
	$(PY) bench/train_gpu_bench.py --out bench/results/train_gpu.json $(GPU_BENCH_ARGS)

gpu-wheels:  ## the wheels a torch-only GPU host needs to run the GPU benchmarks (train, serve) from src/ -> build/gpu-wheels/
	@hack/gpu-wheels.sh $(GPU_PYTHON)

bench-layout:  ## convolution layouts: contiguous vs channels_last inputs vs channels_last model, CPU ms per inference pass and training step -> bench/results/layout.json
	$(PY) bench/layout_bench.py --out bench/results/layout.json

bench-loader:  ## loader CPU ms per sample: batched (PNG, raw pixels; CPU and GPU split) vs the per-sample path -> bench/results/loader.json
	$(PY) bench/loader_bench.py --out bench/results/loader.json

bench-accuracy:  ## counter MAE per head (model.params.head) vs classical, per bin; segmenter IoU on held-out synthetic data
	$(PY) bench/accuracy_bench.py --out bench/results/accuracy.json $(ACCURACY_BENCH_ARGS)

bench-adapt:  ## champion MAE on a shifted field, then fine-tuned vs from scratch on 4-32 images -> bench/results/adapt.{json,png}
	$(PY) bench/adapt_bench.py --out bench/results/adapt.json --plot bench/results/adapt.png $(ADAPT_BENCH_ARGS)

bench-profile:  ## per-layer profiling overhead and coverage (plain vs hooked iterations) -> bench/profile_bench.json
	$(PY) bench/profile_bench.py --out bench/profile_bench.json

bench-scale:  ## fieldkube-scale over 1 and 2 workers: allreduce (DDP), ps-sync, ps-async -> bench/scale_bench.{json,png}
	$(PY) bench/scale_bench.py --out bench/scale_bench.json
