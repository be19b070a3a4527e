# The real local Kubernetes control plane (hack/cluster/): etcd, kube-apiserver (TLS, RBAC),
# kube-controller-manager, kube-scheduler, kwok fake GPU nodes and the Kubeflow mpi-operator as
# loopback processes, and one real node (containerd, kubelet, kube-proxy, CoreDNS; REAL_NODE=0 for
# none). `make cluster [NODES=4] [GPUS_PER_NODE=8]` starts it (and the fieldkube operator, with its
# ServiceAccount's token), `make cluster-down` stops everything it started and undoes its host changes.
CLUSTER_NAME ?= local
CLUSTER_DIR ?= $(or $(FIELDKUBE_CACHE),$(HOME)/.cache/fieldkube)/clusters/$(CLUSTER_NAME)
NODES ?= 4
GPUS_PER_NODE ?= 8
REAL_NODE ?= 1
CLUSTER_HARNESS := $(PY) -m fieldkube.localcluster
# The operator that `make cluster` starts once the cluster (and manifests/crd, manifests/rbac) is up,
# serving /metrics and /healthz on loopback; set OPERATOR_CMD= to start none. It runs as
# OPERATOR_SERVICE_ACCOUNT (NAMESPACE/NAME) when set.
OPERATOR_METRICS_PORT ?= 18080
OPERATOR_HEALTH_PORT ?= 18081
OPERATOR_CMD ?= $(if $(wildcard $(VENV)/bin/fieldkube-operator),$(VENV)/bin/fieldkube-operator run --standalone \
  --bind-address 127.0.0.1 --metrics-port $(OPERATOR_METRICS_PORT) --health-port $(OPERATOR_HEALTH_PORT),)
OPERATOR_SERVICE_ACCOUNT ?= $(if $(wildcard manifests/rbac/serviceaccount.yaml),fieldkube-system/fieldkube-operator,)

.PHONY: cluster-bins cluster-status bench-cluster

cluster-bins:  ## build and cache the control plane binaries (instant when cached)
	@hack/build-cluster-bins.sh

cluster: cluster-bins  ## start the local control plane with NODES fake GPU nodes, and the operator
	@$(CLUSTER_HARNESS) up --state-dir "$(CLUSTER_DIR)" --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) \
	  $(if $(filter 1,$(REAL_NODE)),--real-node,)
	@if [ -n "$(OPERATOR_CMD)" ]; then \
	  $(CLUSTER_HARNESS) spawn --state-dir "$(CLUSTER_DIR)" --name fieldkube-operator \
	    $(if $(OPERATOR_SERVICE_ACCOUNT),--service-account $(OPERATOR_SERVICE_ACCOUNT),) -- $(OPERATOR_CMD); \
	fi
	@echo "export KUBECONFIG=$(CLUSTER_DIR)/kubeconfig"

cluster-down:  ## stop the local control plane started by `make cluster`
	@$(CLUSTER_HARNESS) down --state-dir "$(CLUSTER_DIR)"

cluster-status:  ## show the local control plane's processes
	@$(CLUSTER_HARNESS) status --state-dir "$(CLUSTER_DIR)"

# BENCH_CLUSTER_ARGS: e.g. --cold-build (adds a ~25 min serial vs overlapped cold build comparison).
bench-cluster: cluster-bins  ## cluster start/stop times (and cold builds) -> bench/results/cluster.json
	@$(PY) hack/cluster/bench.py --out bench/results/cluster.json $(BENCH_CLUSTER_ARGS)
