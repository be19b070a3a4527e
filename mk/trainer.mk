# Trainer targets: benchmarks (`make bench-train`, `make bench-accuracy`) and the trainer's own tests.
.PHONY: test-trainer bench-train bench-accuracy

test-trainer:  ## unit + integration tests of fieldkube-train / fieldkube-prepare
	$(PY) -m pytest tests/unit/trainer tests/integration/trainer

bench-train:  ## images/s of fieldkube-train vs a bare loop, Horovod vs DDP, loader wait -> bench/results/train.json
	$(PY) bench/train_bench.py --out bench/results/train.json

bench-accuracy:  ## counter MAE (CNN vs classical, per bin) and segmenter IoU on held-out synthetic data
	$(PY) bench/accuracy_bench.py --out bench/results/accuracy.json
