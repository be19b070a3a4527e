{{- define "fieldkube-operator.labels" -}}
app.kubernetes.io/name: fieldkube-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
