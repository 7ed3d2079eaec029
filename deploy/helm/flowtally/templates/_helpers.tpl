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

{{/* Environment shared by the stages: the ConfigMap, and Kafka credentials from the Secret. */}}
{{- define "flowtally.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "flowtally.fullname" . }}
env:
  {{- if .Values.kafka.saslMechanism }}
  - name: FLOWTALLY_KAFKA_SASL_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "flowtally.secretName" . }}
        key: {{ .Values.secret.kafkaSaslPasswordKey }}
  {{- end }}
{{- end -}}

{{/* The ClickHouse URL (it carries the password) for the stages that write or migrate: never
optional, so a Secret without the key stops the pod (CreateContainerConfigError) instead of
the sink quietly writing to chDB in an emptyDir. */}}
{{- define "flowtally.clickhouseUrlEnv" -}}
- name: FLOWTALLY_CLICKHOUSE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end -}}

{{- define "flowtally.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{- /*
Readiness and liveness are different questions (flowtally/health.py). /healthz (readiness) fails
while a stage cannot do its job now: Kafka not answering for 10 s, inserts failing, start-up work
not done (the watcher's first lists, the enricher's identity replay: minutes on a large cluster),
a batch stuck. The pod then leaves its Service and the reason is in the body; it is not restarted.
/livez (liveness) fails only when the stage's event loop has stopped running for 60 s, which a
restart cures; so liveness never restarts a stage into the same outage or the same poison batch.
The startup probe (also /livez) only covers the process coming up (imports, settings, topics).
*/ -}}
{{- define "flowtally.healthProbes" -}}
{{ include "flowtally.healthProbesOn" "metrics" }}
{{- end -}}

{{/* The same probes on another port (a name or a number: a second container of a pod). */}}
{{- define "flowtally.healthProbesOn" -}}
startupProbe:
  httpGet: {path: /livez, port: {{ . }}}
  periodSeconds: 5
  failureThreshold: 36
livenessProbe:
  httpGet: {path: /livez, port: {{ . }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /healthz, port: {{ . }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}
