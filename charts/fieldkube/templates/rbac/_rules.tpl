{{/* The operator's least privilege: every verb below is used by the operator (operator/README.md).
Namespaced rules: granted cluster-wide, or in each of operator.watchNamespaces. */}}
{{- define "fieldkube.operatorNamespacedRules" -}}
# TrainingJobs: watch, finalizer/annotation patches (kopf), delete after ttlSecondsAfterFinished.
- apiGroups: [fieldkube.io]
  resources: [trainingjobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [fieldkube.io]
  resources: [trainingjobs/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion on the MPIJobs.
- apiGroups: [fieldkube.io]
  resources: [trainingjobs/finalizers]
  verbs: [update]
# The children.
- apiGroups: [kubeflow.org]
  resources: [mpijobs]
  verbs: [get, list, watch, create, patch, delete]
# Status and diagnosis: pods, their logs, scheduling events.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [list, create, patch]
{{- end -}}

{{/* Cluster-scoped rules: always a ClusterRole. */}}
{{- define "fieldkube.operatorClusterRules" -}}
# kopf: peering between replicas, and resource discovery.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end -}}
