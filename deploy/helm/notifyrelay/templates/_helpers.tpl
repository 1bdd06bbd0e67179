{{/* Names and labels, as `helm create` lays them out. */}}
{{- define "notifyrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "notifyrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "notifyrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "notifyrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "notifyrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "notifyrelay.labels" -}}
helm.sh/chart: {{ include "notifyrelay.chart" . }}
{{ include "notifyrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "notifyrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "notifyrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret that holds the DSN, or "" when the relay uses PG* variables. */}}
{{- define "notifyrelay.dsnSecretName" -}}
{{- if .Values.dsn.existingSecret }}
{{- .Values.dsn.existingSecret }}
{{- else if .Values.dsn.value }}
{{- include "notifyrelay.fullname" . }}
{{- end }}
{{- end }}

{{- define "notifyrelay.dsnSecretKey" -}}
{{- if .Values.dsn.existingSecret }}{{ .Values.dsn.existingSecretKey }}{{ else }}dsn{{ end }}
{{- end }}

{{/*
config.toml from .Values.config and .Values.channels: each section a TOML table, each value written as JSON,
which is valid TOML for the strings, numbers, booleans and arrays the configuration uses.
*/}}
{{- define "notifyrelay.configToml" -}}
{{- $config := deepCopy .Values.config }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" (int .Values.ports.websocket)) }}
{{- $_ = set $config "server" $server }}
{{- $admin := get $config "admin" | default dict }}
{{- $_ = set $admin "listen" (printf "0.0.0.0:%d" (int .Values.ports.admin)) }}
{{- $_ = set $config "admin" $admin }}
# Rendered by the notifyrelay Helm chart from its values; the DSN comes from NOTIFYRELAY_DSN_FILE.
{{- range $section, $values := $config }}

[{{ $section }}]
{{- range $key, $value := $values }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- range .Values.channels }}

[[channels]]
{{- range $key, $value := . }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* Seconds: the preStop drain, then the daemon's own shutdown, then room to exit. */}}
{{- define "notifyrelay.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds }}
{{- .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- $shutdown := 10.0 }}
{{- with .Values.config.shutdown }}{{ with .timeout_s }}{{ $shutdown = . }}{{ end }}{{ end }}
{{- add (int .Values.drainSeconds) (int (ceil $shutdown)) 10 }}
{{- end }}
{{- end }}
