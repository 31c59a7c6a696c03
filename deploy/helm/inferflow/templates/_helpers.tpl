{{/* Names and labels. */}}
{{- define "inferflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferflow.fullname" -}}
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

{{- define "inferflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inferflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "inferflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "inferflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Where things are mounted in the container. */}}
{{- define "inferflow.configPath" -}}/etc/inferflow/config/inferflow.toml{{- end }}
{{- define "inferflow.pipelinesDir" -}}/etc/inferflow/pipelines{{- end }}
{{- define "inferflow.tokensDir" -}}/var/run/secrets/inferflow/tokens{{- end }}
{{- define "inferflow.tlsDir" -}}/etc/inferflow/tls{{- end }}

{{/*
Checks across values, with messages naming the values to change. Included by every template
that depends on them, so `helm template` fails whichever file is rendered.
*/}}
{{- define "inferflow.validate" -}}
{{- $partitions := int .Values.kafka.requestsPartitions }}
{{- if and (not .Values.keda.enabled) (gt (int .Values.replicaCount) $partitions) }}
{{- fail (printf "replicaCount (%d) exceeds kafka.requestsPartitions (%d): a consumer group member beyond the partition count gets no partition. Lower replicaCount or add partitions to the requests topic first." (int .Values.replicaCount) $partitions) }}
{{- end }}
{{- if .Values.keda.enabled }}
{{- if gt (int .Values.keda.minReplicas) $partitions }}
{{- fail (printf "keda.minReplicas (%d) exceeds kafka.requestsPartitions (%d): a consumer group member beyond the partition count gets no partition." (int .Values.keda.minReplicas) $partitions) }}
{{- end }}
{{- if gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas) }}
{{- fail (printf "keda.minReplicas (%d) exceeds keda.maxReplicas (%d)" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.http.tls.enabled (not .Values.http.tls.secretName) }}
{{- fail "http.tls.enabled needs http.tls.secretName: a Secret with tls.crt and tls.key (and ca.crt with http.tls.clientAuth)" }}
{{- end }}
{{- if and .Values.http.tls.clientAuth (not .Values.http.tls.enabled) }}
{{- fail "http.tls.clientAuth needs http.tls.enabled" }}
{{- end }}
{{- if and .Values.http.tls.clientAuth (not .Values.http.ops.enabled) }}
{{- fail "http.tls.clientAuth needs http.ops.enabled: the kubelet's probes carry no client certificate, so /healthz and /readyz must be served on the ops port" }}
{{- end }}
{{- if and (not .Values.http.ops.enabled) (not (include "inferflow.apiExposed" .)) }}
{{- fail "http.ops.enabled is false, so the probes use the API port, which then must listen on the pod network: configure http.tokens (or http.tls.clientAuth), or set http.allowUnauthenticated" }}
{{- end }}
{{- range .Values.http.tokens }}
{{- if not (or .secretName .value) }}
{{- fail (printf "http.tokens[%s] needs secretName (an existing Secret) or value" .name) }}
{{- end }}
{{- end }}
{{- range .Values.secretEnv }}
{{- if not (or .secretName .value) }}
{{- fail (printf "secretEnv[%s] needs secretName (an existing Secret) or value" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Non-empty when the API listens on the pod network (0.0.0.0) rather than loopback. */}}
{{- define "inferflow.apiExposed" -}}
{{- if or .Values.http.tokens .Values.http.allowUnauthenticated (and .Values.http.tls.enabled .Values.http.tls.clientAuth) }}true{{- end }}
{{- end }}

{{/* The token's file name in the tokens directory. */}}
{{- define "inferflow.tokenKey" -}}
{{- default .name .secretKey }}
{{- end }}

{{/*
The effective configuration as JSON: .Values.config with the keys the chart owns set over it.
Read it with `include "inferflow.config" . | fromJson`.
*/}}
{{- define "inferflow.config" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- $kafka := dict "bootstrap_servers" .Values.kafka.bootstrapServers }}
{{- $topics := dict "create_partitions" (int .Values.kafka.requestsPartitions) }}
{{- $processing := dict "guarantee" .Values.processing.guarantee }}
{{- $host := ternary "0.0.0.0" "127.0.0.1" (eq (include "inferflow.apiExposed" .) "true") }}
{{- $http := dict "listen" (printf "%s:%d" $host (int .Values.http.port)) "allow_unauthenticated" .Values.http.allowUnauthenticated }}
{{- if .Values.http.ops.enabled }}
{{- $_ := set $http "ops_listen" (printf "0.0.0.0:%d" (int .Values.http.ops.port)) }}
{{- end }}
{{- if .Values.http.tokens }}
{{- $tokens := list }}
{{- range .Values.http.tokens }}
{{- $t := dict "name" .name "file" (printf "%s/%s" (include "inferflow.tokensDir" $) .name) "scopes" .scopes }}
{{- with .tenant }}{{ $_ := set $t "tenant" . }}{{ end }}
{{- with .maxRequestsPerSecond }}{{ $_ := set $t "max_requests_per_second" (int .) }}{{ end }}
{{- with .maxInFlight }}{{ $_ := set $t "max_in_flight" (int .) }}{{ end }}
{{- $tokens = append $tokens $t }}
{{- end }}
{{- $_ := set $http "tokens" $tokens }}
{{- end }}
{{- if .Values.http.tls.enabled }}
{{- $dir := include "inferflow.tlsDir" . }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) }}
{{- if .Values.http.tls.clientAuth }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $dir) }}
{{- $clients := list }}
{{- range .Values.http.tls.clients }}
{{- $c := dict "common_name" .commonName "scopes" .scopes }}
{{- with .tenant }}{{ $_ := set $c "tenant" . }}{{ end }}
{{- $clients = append $clients $c }}
{{- end }}
{{- if $clients }}{{ $_ := set $tls "clients" $clients }}{{ end }}
{{- end }}
{{- $_ := set $http "tls" $tls }}
{{- end }}
{{- $managed := dict "kafka" $kafka "topics" $topics "processing" $processing "http" $http }}
{{- if .Values.pipelines }}
{{- $_ := set $managed "pipelines" (dict "dir" (include "inferflow.pipelinesDir" .)) }}
{{- end }}
{{- mergeOverwrite $cfg $managed | toJson }}
{{- end }}

{{/*
A map rendered as TOML: scalars and arrays of scalars as `key = value`, maps as [tables],
lists of maps as [[arrays of tables]], in key order. Integral numbers are written as integers
(Helm reads YAML numbers as float64, and inferflow refuses 16384.0 where it wants an integer).
Argument: dict "path" (the table's dotted path, "" at the top) "map" (the map).
*/}}
{{- define "inferflow.toml.table" -}}
{{- $path := .path }}
{{- $m := .map }}
{{- range $k, $v := $m }}
{{- if not (or (kindIs "map" $v) (and (kindIs "slice" $v) $v (kindIs "map" (first $v)))) }}
{{ include "inferflow.toml.key" $k }} = {{ include "inferflow.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $m }}
{{- $sub := ternary (include "inferflow.toml.key" $k) (printf "%s.%s" $path (include "inferflow.toml.key" $k)) (eq $path "") }}
{{- if kindIs "map" $v }}

[{{ $sub }}]
{{- include "inferflow.toml.table" (dict "path" $sub "map" $v) }}
{{- else if and (kindIs "slice" $v) $v (kindIs "map" (first $v)) }}
{{- range $v }}

[[{{ $sub }}]]
{{- include "inferflow.toml.table" (dict "path" $sub "map" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "inferflow.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "inferflow.toml.value" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "inferflow.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" . }}{}
{{- else if eq (kindOf .) "invalid" }}{{ fail "null in config: leave the key out instead (TOML has no null)" }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/*
The container's memory limit in MiB, from the configuration's bounded buffers and caches
(defaults as in config/default.toml when a key is not set in .Values.config):

  prefetch  = consumers × kafka.consumer_queue_kbytes KiB
              (consumers: the request consumer, plus ingestion's when ingest.enabled)
  in flight = executor.max_in_flight_records × memory.requestBytes
              + ingest.max_in_flight_records × memory.featureUpdateBytes (when ingest.enabled)
  caches    = result_cache.max_bytes
              + feature_store.cache_max_entries × memory.featureEntryBytes
              + replay.max_entries × memory.replayEntryBytes (when replay.enabled)
  limit     = ceil((memory.baseMiB + memory.modelsMiB + (prefetch + in flight + caches) in MiB)
              × (100 + memory.headroomPercent) / 100)

memory.limitMiB > 0 replaces the computed value.
*/}}
{{- define "inferflow.memoryMiB" -}}
{{- $m := .Values.memory }}
{{- if gt (int $m.limitMiB) 0 }}
{{- int $m.limitMiB }}
{{- else }}
{{- $cfg := include "inferflow.config" . | fromJson }}
{{- $ingest := dig "ingest" "enabled" true $cfg }}
{{- $consumers := ternary 2 1 $ingest }}
{{- $prefetch := mul $consumers (int64 (dig "kafka" "consumer_queue_kbytes" 16384 $cfg)) 1024 }}
{{- $inflight := mul (int64 (dig "executor" "max_in_flight_records" 4096 $cfg)) (int64 $m.requestBytes) }}
{{- if $ingest }}
{{- $inflight = add $inflight (mul (int64 (dig "ingest" "max_in_flight_records" 8192 $cfg)) (int64 $m.featureUpdateBytes)) }}
{{- end }}
{{- $caches := add (int64 (dig "result_cache" "max_bytes" 67108864 $cfg)) (mul (int64 (dig "feature_store" "cache_max_entries" 100000 $cfg)) (int64 $m.featureEntryBytes)) }}
{{- if dig "replay" "enabled" true $cfg }}
{{- $caches = add $caches (mul (int64 (dig "replay" "max_entries" 100000 $cfg)) (int64 $m.replayEntryBytes)) }}
{{- end }}
{{- $mib := 1048576 }}
{{- $dataMiB := div (add $prefetch $inflight $caches (sub $mib 1)) $mib }}
{{- $base := add (int64 $m.baseMiB) (int64 $m.modelsMiB) $dataMiB }}
{{- div (add (mul $base (add 100 (int64 $m.headroomPercent))) 99) 100 }}
{{- end }}
{{- end }}

{{/* Grace period: executor.shutdown_timeout_ms plus 15 s, unless set. */}}
{{- define "inferflow.terminationGracePeriod" -}}
{{- if gt (int .Values.terminationGracePeriodSeconds) 0 }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- $cfg := include "inferflow.config" . | fromJson }}
{{- add (div (add (int64 (dig "executor" "shutdown_timeout_ms" 30000 $cfg)) 999) 1000) 15 }}
{{- end }}
{{- end }}

{{/* The Secret the chart creates for tokens and variables given by value. */}}
{{- define "inferflow.generatedSecret" -}}{{ include "inferflow.fullname" . }}-secrets{{- end }}
{{- define "inferflow.needsGeneratedSecret" -}}
{{- range .Values.http.tokens }}{{ if and .value (not .secretName) }}true{{ end }}{{ end }}
{{- range .Values.secretEnv }}{{ if and .value (not .secretName) }}true{{ end }}{{ end }}
{{- end }}
