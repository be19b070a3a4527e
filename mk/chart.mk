# The Helm chart (charts/fieldkube) and the kubectl-apply manifests rendered from it, with the pinned helm
# that hack/build-cluster-bins.sh builds (`make helm` prints its path).
HELM = $(shell $(PY) -c 'from fieldkube.localcluster.chart import binaries; print(binaries().helm)' 2>/dev/null)
.PHONY: helm chart-lint manifests manifests-check

helm: cluster-bins  ## build (once) the pinned helm and print its path
	@echo $(HELM)

chart-lint:  ## helm lint charts/fieldkube with the default values and each charts/fieldkube/ci/*-values.yaml
	@$(HELM) lint charts/fieldkube
	@for f in charts/fieldkube/ci/*-values.yaml; do $(HELM) lint charts/fieldkube -f $$f || exit 1; done

manifests:  ## render manifests/{crd,rbac,operator,mlflow,serving,monitoring} from charts/fieldkube
	$(PY) -m fieldkube.localcluster.chart manifests

manifests-check:  ## fail when manifests/ differs from what the chart renders
	$(PY) -m fieldkube.localcluster.chart manifests --check
