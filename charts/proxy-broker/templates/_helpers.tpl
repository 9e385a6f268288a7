{{/* Names and labels. */}}

{{- define "proxy-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "proxy-broker.fullname" -}}
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

{{- define "proxy-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "proxy-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "proxy-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "proxy-broker.labels" -}}
helm.sh/chart: {{ include "proxy-broker.chart" . }}
{{ include "proxy-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: broker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "proxy-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "proxy-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "proxy-broker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Paths inside the container; the Dockerfile uses the same ones. */}}
{{- define "proxy-broker.configDir" -}}/etc/proxy-broker{{- end }}
{{- define "proxy-broker.configPath" -}}/etc/proxy-broker/broker.yaml{{- end }}
{{- define "proxy-broker.secretsDir" -}}/etc/proxy-broker/secrets{{- end }}
{{- define "proxy-broker.tlsDir" -}}/etc/proxy-broker/tls{{- end }}
{{- define "proxy-broker.redisDir" -}}/etc/proxy-broker/redis{{- end }}

{{/* Credential keys the chart knows, and the auth_credentials key each one's file path goes to. */}}
{{- define "proxy-broker.credentialFileKeys" -}}
{{- dict "token" "token_file" "api_key" "api_key_file" "cert" "cert_file" "key" "key_file" "ca" "ca_file" | toJson }}
{{- end }}

{{- define "proxy-broker.serverTokensKey" -}}server-auth-tokens{{- end }}

{{/* The Secret holding credentials: the chart's, the user's, or none (""). */}}
{{- define "proxy-broker.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if or .Values.secrets.authCredentials .Values.secrets.serverAuthTokens }}
{{- include "proxy-broker.fullname" . }}
{{- end }}
{{- end }}

{{/* The keys of that Secret the pod mounts, as a JSON list (sorted). */}}
{{- define "proxy-broker.secretKeys" -}}
{{- $keys := list }}
{{- if .Values.secrets.existingSecret }}
{{- if or .Values.secrets.authCredentials .Values.secrets.serverAuthTokens }}
{{- fail "secrets.existingSecret is set: leave secrets.authCredentials and secrets.serverAuthTokens empty and list the Secret's keys in secrets.existingSecretKeys" }}
{{- end }}
{{- if not .Values.secrets.existingSecretKeys }}
{{- fail "secrets.existingSecret is set: list the keys it holds in secrets.existingSecretKeys (token, api_key, cert, key, ca, server-auth-tokens)" }}
{{- end }}
{{- $keys = .Values.secrets.existingSecretKeys }}
{{- else }}
{{- if .Values.secrets.existingSecretKeys }}
{{- fail "secrets.existingSecretKeys is set without secrets.existingSecret" }}
{{- end }}
{{- $keys = keys .Values.secrets.authCredentials }}
{{- if .Values.secrets.serverAuthTokens }}
{{- $keys = append $keys (include "proxy-broker.serverTokensKey" .) }}
{{- end }}
{{- end }}
{{- $keys | sortAlpha | toJson }}
{{- end }}

{{/*
The configuration file: .Values.config plus the keys the chart owns.
  - server.listen / server.metrics_listen from containerPorts (kept if given with the same ports);
  - proxy.external_service.auth_credentials.<key>_file for each mounted credential;
  - server.auth_tokens_file when client tokens are mounted;
  - server.tls.* when tls.enabled;
  - server.reload: false when reload.enabled is false (true is the broker's default and is left out).
  - store.* from the store values (store.redis.password_file when store.redis.existingSecret is set).
Secrets or chart-owned keys written into .Values.config fail the render with the values key to use.
*/}}
{{- define "proxy-broker.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $proxy := dict }}
{{- if kindIs "map" $cfg.proxy }}{{- $proxy = $cfg.proxy }}{{- end }}
{{- $_ := set $cfg "proxy" $proxy }}
{{- $server := dict }}
{{- if kindIs "map" $cfg.server }}{{- $server = $cfg.server }}{{- end }}
{{- $_ := set $cfg "server" $server }}

{{- /* Listen addresses follow the container ports. */}}
{{- range $key, $port := dict "listen" .Values.containerPorts.grpc "metrics_listen" .Values.containerPorts.metrics }}
{{- $addr := get $server $key | toString }}
{{- if eq $addr "" }}
{{- $_ := set $server $key (printf "0.0.0.0:%d" (int $port)) }}
{{- else if not (hasSuffix (printf ":%d" (int $port)) $addr) }}
{{- fail (printf "config.server.%s is '%s' but the container port is %d: change containerPorts (or drop config.server.%s)" $key $addr (int $port) $key) }}
{{- end }}
{{- end }}

{{- /* Graceful drain must fit in the pod's termination grace period. */}}
{{- $grace := 10 }}
{{- if hasKey $server "shutdown_grace_seconds" }}{{- $grace = int (get $server "shutdown_grace_seconds") }}{{- end }}
{{- if ge $grace (int .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.server.shutdown_grace_seconds (%d), or Kubernetes kills the broker mid-drain" (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- end }}

{{- /* Chart-owned server keys. */}}
{{- range $key, $instead := dict "auth_tokens" "secrets.serverAuthTokens" "auth_tokens_file" "secrets.serverAuthTokens or secrets.existingSecretKeys" "tls" "tls.enabled and tls.existingSecret" "reload" "reload.enabled" }}
{{- if hasKey $server $key }}
{{- fail (printf "config.server.%s is set by the chart: use %s instead" $key $instead) }}
{{- end }}
{{- end }}

{{- /* Upstream credentials. */}}
{{- $ext := dict }}
{{- if kindIs "map" $proxy.external_service }}{{- $ext = $proxy.external_service }}{{- end }}
{{- $creds := dict }}
{{- if kindIs "map" $ext.auth_credentials }}{{- $creds = $ext.auth_credentials }}{{- end }}
{{- range $key := list "token" "api_key" }}
{{- if hasKey $creds $key }}
{{- fail (printf "config.proxy.external_service.auth_credentials.%s is a secret: put it in secrets.authCredentials.%s (the chart mounts it and sets %s_file)" $key $key $key) }}
{{- end }}
{{- end }}
{{- $fileKeys := include "proxy-broker.credentialFileKeys" . | fromJson }}
{{- $mounted := include "proxy-broker.secretKeys" . | fromJsonArray }}
{{- range $key := $mounted }}
{{- if hasKey $fileKeys $key }}
{{- $fileKey := get $fileKeys $key }}
{{- if hasKey $creds $fileKey }}
{{- fail (printf "config.proxy.external_service.auth_credentials.%s is set by the chart from the secret key %s: remove it from config" $fileKey $key) }}
{{- end }}
{{- $_ := set $creds $fileKey (printf "%s/%s" (include "proxy-broker.secretsDir" $) $key) }}
{{- end }}
{{- end }}
{{- if $creds }}
{{- $_ := set $ext "auth_credentials" $creds }}
{{- $_ := set $proxy "external_service" $ext }}
{{- end }}

{{- /* Client authentication. */}}
{{- if has (include "proxy-broker.serverTokensKey" .) $mounted }}
{{- $_ := set $server "auth_tokens_file" (printf "%s/%s" (include "proxy-broker.secretsDir" .) (include "proxy-broker.serverTokensKey" .)) }}
{{- end }}

{{- /* Server TLS. */}}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.existingSecret }}
{{- fail "tls.enabled needs tls.existingSecret: a kubernetes.io/tls Secret with tls.crt and tls.key (and ca.crt for tls.clientAuth)" }}
{{- end }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" (include "proxy-broker.tlsDir" .)) "key_file" (printf "%s/tls.key" (include "proxy-broker.tlsDir" .)) }}
{{- if .Values.tls.clientAuth }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" (include "proxy-broker.tlsDir" .)) }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- else if .Values.tls.clientAuth }}
{{- fail "tls.clientAuth needs tls.enabled" }}
{{- end }}

{{- /* Hot reload. */}}
{{- if not .Values.reload.enabled }}
{{- $_ := set $server "reload" false }}
{{- end }}

{{- /* Brokering state store: rendered from the store values only. */}}
{{- if hasKey $cfg "store" }}
{{- fail "config.store is set by the chart: use the store values (store.backend, store.redis.url, ...)" }}
{{- end }}
{{- $st := .Values.store }}
{{- if eq $st.backend "redis" }}
{{- $r := $st.redis }}
{{- if and (not $r.url) (not $r.urls) }}
{{- fail "store.backend is redis: set store.redis.url (one server) or store.redis.urls with store.redis.cluster: true" }}
{{- end }}
{{- range $u := concat (list $r.url) $r.urls }}
{{- if regexMatch "^[A-Za-z]+://[^/@]*:[^/@]*@" $u }}
{{- fail "store.redis.url and store.redis.urls must not hold a password (it would be written to the ConfigMap): put it in a Secret and name it in store.redis.existingSecret" }}
{{- end }}
{{- end }}
{{- $redis := dict "key_prefix" $r.keyPrefix "operation_timeout_ms" (int $r.operationTimeoutMs) }}
{{- if $r.url }}{{- $_ := set $redis "url" $r.url }}{{- end }}
{{- if $r.urls }}{{- $_ := set $redis "urls" $r.urls }}{{- end }}
{{- if $r.cluster }}{{- $_ := set $redis "cluster" true }}{{- end }}
{{- if $r.existingSecret }}
{{- $_ := set $redis "password_file" (printf "%s/%s" (include "proxy-broker.redisDir" .) $r.passwordKey) }}
{{- end }}
{{- $_ := set $cfg "store" (dict "backend" "redis" "redis" $redis) }}
{{- end }}

{{- toYaml $cfg }}
{{- end }}
