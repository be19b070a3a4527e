# The end-to-end demo (hack/demo.py): `make demo`, `make demo DETACH=1`, `make demo-down`.
DEMO_FLAGS := $(if $(DETACH),--detach,) $(if $(SMALL),--small,)

demo:  ## the whole flow on this machine (MLflow, data, 2-rank Horovod training, serving, results)
	$(PY) hack/demo.py up $(DEMO_FLAGS)

demo-down:  ## stop a demo started with DETACH=1
	$(PY) hack/demo.py down

demo-cluster:  ## the TrainingJob flow on the local cluster (a CPU job in real pods, GPU jobs simulated)
	$(PY) hack/demo_cluster.py up $(if $(DETACH),--detach,)

demo-cluster-down:  ## stop a cluster left running by `make demo-cluster DETACH=1`
	$(PY) hack/demo_cluster.py down
