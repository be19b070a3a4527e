{{/* Names: <fullname>-<component> for namespaced objects; cluster-scoped ones add the namespace. */}}
{{- define "fieldkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fieldkube.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects (ClusterRole, its binding) and Roles in watched
namespaces: two releases of the same name in different namespaces must not share them. */}}
{{- define "fieldkube.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "fieldkube.fullname" .) -}}
{{- end -}}

{{- define "fieldkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "fieldkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fieldkube.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fieldkube.labels" -}}
{{ include "fieldkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fieldkube
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "fieldkube.chart" .ctx }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fieldkube.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "fieldkube.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{- define "fieldkube.mlflowName" -}}
{{- printf "%s-mlflow" (include "fieldkube.fullname" .) -}}
{{- end -}}

{{/* The tracking URI clients use: explicit, else the chart's MLflow Service, else empty. */}}
{{- define "fieldkube.trackingUri" -}}
{{- if .explicit -}}
{{- .explicit -}}
{{- else if .ctx.Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%v" (include "fieldkube.mlflowName" .ctx) .ctx.Release.Namespace .ctx.Values.mlflow.port -}}
{{- end -}}
{{- end -}}

{{- define "fieldkube.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* Restricted Pod Security: the pod and container halves. */}}
{{- define "fieldkube.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fieldkube.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* HOME is on the read-only root: caches and configuration go to the /tmp emptyDir. */}}
{{- define "fieldkube.tmpEnv" -}}
- name: TMPDIR
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: XDG_CONFIG_HOME
  value: /tmp/.config
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* nodeSelector, tolerations, affinity, priorityClassName and pull secrets of a component's pods. */}}
{{- define "fieldkube.scheduling" -}}
{{- with .component.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
