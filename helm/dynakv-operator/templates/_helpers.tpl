{{/* Full name of the release's objects. */}}
{{- define "dynakv-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dynakv-operator.selectorLabels" -}}
app.kubernetes.io/name: dynakv-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dynakv-operator.labels" -}}
{{ include "dynakv-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dynakv-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dynakv-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
