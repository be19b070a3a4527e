{{/* The operator's least privilege: every verb below is used by the operator (operator/README.md).
Namespaced rules: granted cluster-wide, or in each of operator.watchNamespaces. */}}
{{- define "fieldkube.operatorNamespacedRules" -}}
# TrainingJobs: watched (kopf), an earlier version's finalizer removed, deleted after ttlSecondsAfterFinished.
- apiGroups: [fieldkube.io]
  resources: [trainingjobs]
  verbs: [list, watch, patch, delete]
- apiGroups: [fieldkube.io]
  resources: [trainingjobs/status]
  verbs: [patch]
# Owner references with blockOwnerDeletion on the MPIJobs.
- apiGroups: [fieldkube.io]
  resources: [trainingjobs/finalizers]
  verbs: [update]
# The children: watched, created (again if deleted), suspended and resumed.
- apiGroups: [kubeflow.org]
  resources: [mpijobs]
  verbs: [list, watch, create, patch]
# Status and diagnosis: pods, their logs (when a job asks for log tails), Warning events (pods refused at
# admission, volume errors, scheduling); kopf posts its warnings as events.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [list, watch, create]
{{- end -}}

{{/* Cluster-scoped rules: always a ClusterRole. */}}
{{- define "fieldkube.operatorClusterRules" -}}
# kopf: resource discovery, and the watched namespaces (it lists them when given --namespace).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end -}}
