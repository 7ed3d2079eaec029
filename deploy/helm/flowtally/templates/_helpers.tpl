{{- define "flowtally.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "flowtally.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flowtally.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flowtally.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "flowtally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "flowtally.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "flowtally.secretName" -}}
{{ default (printf "%s-credentials" (include "flowtally.fullname" .)) .Values.secret.existingSecret }}
{{- end -}}

{{/* Pod annotations: roll pods when the configuration or the chart-written Secret changes. */}}
{{- define "flowtally.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/* Environment shared by the stages: the ConfigMap, and credentials from the Secret. */}}
{{- define "flowtally.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "flowtally.fullname" . }}
env:
  - name: FLOWTALLY_CLICKHOUSE_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "flowtally.secretName" . }}
        key: {{ .Values.secret.clickhouseUrlKey }}
        optional: true
  {{- if .Values.kafka.saslMechanism }}
  - name: FLOWTALLY_KAFKA_SASL_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "flowtally.secretName" . }}
        key: {{ .Values.secret.kafkaSaslPasswordKey }}
  {{- end }}
{{- end -}}

{{- define "flowtally.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{- /*
/healthz turns healthy only after a stage's start-up work (the watcher's first full lists, the
enricher's replay of the identity topic), which takes minutes on a large cluster: the startup
probe holds the liveness probe off for up to 10 minutes instead of restarting the pod mid-way.
*/ -}}
{{- define "flowtally.healthProbes" -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  initialDelaySeconds: 20
  periodSeconds: 10
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
{{- end -}}
