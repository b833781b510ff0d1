{{/* Names: the release's, cut to what DNS labels allow. */}}
{{- define "kvferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvferry.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* labels ROOT COMPONENT */}}
{{- define "kvferry.labels" -}}
{{ include "kvferry.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/version: {{ (index . 0).Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
helm.sh/chart: {{ printf "%s-%s" (index . 0).Chart.Name (index . 0).Chart.Version }}
{{- end -}}

{{- define "kvferry.componentSelector" -}}
{{ include "kvferry.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kvferry.image" -}}
{{- if eq .Values.image.tag "latest" }}{{ fail "image.tag: pin a version; \"latest\" is refused" }}{{ end -}}
{{- if .Values.image.digest -}}
{{ printf "%s:%s@%s" .Values.image.repository .Values.image.tag .Values.image.digest | quote }}
{{- else -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}
{{- end -}}

{{/* kvferry.checkAuth fails the render of an open router unless the
     operator asked for one. */}}
{{- define "kvferry.checkAuth" -}}
{{- if not (or .Values.auth.apiKeysSecret .Values.auth.insecure) -}}
{{ fail "auth.apiKeysSecret: name a Secret with a key \"keys\" (one API key per line), or set auth.insecure: true to serve without API keys" }}
{{- end -}}
{{- end -}}

{{- define "kvferry.ctxName" -}}{{ include "kvferry.fullname" . }}-ctx{{- end -}}
{{- define "kvferry.genName" -}}{{ include "kvferry.fullname" . }}-gen{{- end -}}
{{- define "kvferry.routerName" -}}{{ include "kvferry.fullname" . }}-router{{- end -}}
{{- define "kvferry.pairName" -}}{{ include "kvferry.fullname" . }}-pair{{- end -}}

{{/* The model flags, the same on the router and every server (the router
tokenizes with the model and runs no engine). */}}
{{- define "kvferry.modelArgs" -}}
- --engine={{ .Values.model.engine }}
{{- if eq .Values.model.engine "llamacpp" }}
{{- if not .Values.model.file }}{{ fail "model.file is required with model.engine=llamacpp" }}{{ end }}
{{- if not .Values.model.volume }}{{ fail "model.volume is required with model.engine=llamacpp" }}{{ end }}
- --model-path=/models/{{ .Values.model.file }}
{{- with .Values.model.sha256 }}
- --model-sha256={{ . }}
{{- end }}
{{- else if eq .Values.model.engine "synthetic" }}
- --model={{ .Values.model.preset }}
{{- else }}
{{- fail "model.engine must be synthetic or llamacpp" }}
{{- end }}
{{- with .Values.model.servedName }}
- --served-model-name={{ . }}
{{- end }}
{{- end -}}

{{/* The engine flags of the servers: the model's, then how the engine runs it. */}}
{{- define "kvferry.engineArgs" -}}
{{ include "kvferry.modelArgs" . }}
{{- if eq .Values.model.engine "llamacpp" }}
- --gpu-layers={{ .Values.model.gpuLayers }}
- --llama-threads={{ .Values.model.threads }}
{{- end }}
{{- end -}}

{{/* TLS flags of ROLE (router, ctxserver, genserver). */}}
{{- define "kvferry.tlsArgs" -}}
{{- if (index . 0).Values.tls.enabled }}
- --tls-cert=/etc/kvferry/tls/tls.crt
- --tls-key=/etc/kvferry/tls/tls.key
- --tls-ca=/etc/kvferry/tls/ca.crt
- --tls-trust-domain={{ (index . 0).Values.tls.trustDomain }}
{{- if and (ne (index . 1) "router") (index . 0).Values.tls.dataTLS }}
- --data-tls
{{- end }}
{{- end }}
{{- end -}}

{{/* Health and shutdown flags of a server. */}}
{{- define "kvferry.healthArgs" -}}
- --progress-deadline={{ .Values.health.progressDeadline }}
- --transfer-deadline={{ .Values.health.transferDeadline }}
- --poison-budget={{ .Values.health.poisonBudget }}
- --shutdown-grace={{ .Values.health.shutdownGrace }}
{{- end -}}

{{- define "kvferry.terminationGrace" -}}
{{- $d := .Values.health.shutdownGrace | toString -}}
{{- if not (regexMatch "^[0-9]+s$" $d) }}{{ fail "health.shutdownGrace must be whole seconds, like 10s" }}{{ end -}}
{{- add (trimSuffix "s" $d | atoi) .Values.health.terminationGraceExtraSeconds -}}
{{- end -}}

{{/* Probes on the admin port named PORT. */}}
{{- define "kvferry.probes" -}}
startupProbe:
  httpGet: {path: /livez, port: {{ index . 1 }}}
  periodSeconds: 5
  failureThreshold: {{ div (index . 0).Values.health.startupSeconds 5 }}
livenessProbe:
  httpGet: {path: /livez, port: {{ index . 1 }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: {{ index . 1 }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{- define "kvferry.securityContext" -}}
runAsNonRoot: true
runAsUser: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* Volumes every pod may need: the model, the role certificate, /tmp. */}}
{{- define "kvferry.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if eq (index . 0).Values.model.engine "llamacpp" }}
- name: models
  {{- toYaml (index . 0).Values.model.volume | nindent 2 }}
{{- end }}
{{- if (index . 0).Values.tls.enabled }}
{{- range (index . 1) }}
- name: tls-{{ . }}
  secret:
    secretName: {{ include "kvferry.fullname" (index $ 0) }}-{{ . }}-tls
{{- end }}
{{- end }}
{{- end -}}

{{/* Mounts of one container of ROLE. */}}
{{- define "kvferry.mounts" -}}
- {name: tmp, mountPath: /tmp}
{{- if eq (index . 0).Values.model.engine "llamacpp" }}
- {name: models, mountPath: /models, readOnly: true}
{{- end }}
{{- if (index . 0).Values.tls.enabled }}
- {name: tls-{{ index . 1 }}, mountPath: /etc/kvferry/tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "kvferry.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile: {type: RuntimeDefault}
terminationGracePeriodSeconds: {{ include "kvferry.terminationGrace" . }}
{{- end -}}

{{/* nodeSelector, tolerations and affinity of a component's values. */}}
{{- define "kvferry.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The router container (without its name): ROOT and its discovery,
     "ctx=SVC,gen=SVC" for EndpointSlices or "" for the pair's loopback. */}}
{{- define "kvferry.routerContainer" -}}
{{- $ := index . 0 -}}
image: {{ include "kvferry.image" $ }}
imagePullPolicy: {{ $.Values.image.pullPolicy }}
command: ["/usr/local/bin/router"]
args:
  {{- include "kvferry.modelArgs" $ | nindent 2 }}
  {{- if index . 1 }}
  - --k8s-service={{ index . 1 }}
  {{- else }}
  - --ctx-servers=127.0.0.1:9100
  - --gen-servers=127.0.0.1:9200
  {{- end }}
  {{- if $.Values.aggregated }}
  - --aggregated
  {{- end }}
  - --max-inflight={{ $.Values.router.maxInflight }}
  - --request-timeout={{ $.Values.router.requestTimeout }}
  - --shutdown-grace={{ $.Values.health.shutdownGrace }}
  {{- if $.Values.auth.apiKeysSecret }}
  - --api-keys-file=/etc/kvferry/api-keys/keys
  {{- end }}
  {{- include "kvferry.tlsArgs" (list $ "router") | nindent 2 }}
  {{- with $.Values.router.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - {name: http, containerPort: 8000}
  - {name: grpc, containerPort: 8001}
  - {name: admin, containerPort: 8002}
{{- include "kvferry.probes" (list $ "admin") | nindent 0 }}
resources:
  {{- toYaml $.Values.router.resources | nindent 2 }}
securityContext:
  {{- include "kvferry.securityContext" $ | nindent 2 }}
volumeMounts:
  {{- include "kvferry.mounts" (list $ "router") | nindent 2 }}
  {{- if $.Values.auth.apiKeysSecret }}
  - {name: api-keys, mountPath: /etc/kvferry/api-keys, readOnly: true}
  {{- end }}
{{- end -}}

{{- define "kvferry.apiKeysVolume" -}}
{{- if .Values.auth.apiKeysSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.apiKeysSecret }}
{{- end }}
{{- end -}}

{{/* A server container (without its name): ROOT, ROLE (ctxserver or
     genserver), PAIR (true inside an shm pair pod). */}}
{{- define "kvferry.serverContainer" -}}
{{- $ := index . 0 -}}
{{- $role := index . 1 -}}
{{- $pair := index . 2 -}}
{{- $v := index $.Values $role -}}
{{- $bin := printf "/usr/local/bin/%s" $role -}}
image: {{ include "kvferry.image" $ }}
imagePullPolicy: {{ $.Values.image.pullPolicy }}
{{- if and (eq $role "genserver") $.Values.tls.enabled (not $pair) }}
# The data endpoint is advertised by DNS name under the data Service
# (CoreDNS names each endpoint by its dashed IP; the Service publishes
# not-ready pods too, so a server the canary marked unready stays
# reachable by the canary that would clear it), which the generation
# servers' certificate covers; a context server pushes KV only there.
command: ["/bin/sh", "-c", "exec {{ $bin }} --advertise-host=\"$(echo \"$POD_IP\" | tr .: --).{{ include "kvferry.genName" $ }}-data.{{ $.Release.Namespace }}.svc.{{ $.Values.tls.clusterDomain }}\" \"$@\"", "{{ $role }}"]
{{- else }}
command: [{{ $bin | quote }}]
{{- end }}
args:
  {{- include "kvferry.engineArgs" $ | nindent 2 }}
  - --pool-blocks={{ $v.poolBlocks }}
  - --max-queue={{ $v.maxQueue }}
  {{- if $pair }}
  # gRPC on loopback: only the pair's own router calls these servers.
  - --grpc-addr=127.0.0.1:{{ ternary 9100 9200 (eq $role "ctxserver") }}
  - --transport=shm
  - --shm-dir=/run/kvferry
  {{- else }}
  - --transport=tcp
  {{- end }}
  {{- if and (eq $role "genserver") $.Values.aggregated }}
  - --aggregated
  {{- end }}
  {{- include "kvferry.healthArgs" $ | nindent 2 }}
  {{- include "kvferry.tlsArgs" (list $ $role) | nindent 2 }}
  {{- with $v.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if not $pair }}
env:
  - name: POD_IP
    valueFrom: {fieldRef: {fieldPath: status.podIP}}
  {{- if not (and (eq $role "genserver") $.Values.tls.enabled) }}
  - {name: KVFERRY_ADVERTISE_HOST, value: "$(POD_IP)"}
  {{- end }}
{{- end }}
ports:
{{- if eq $role "ctxserver" }}
  - {name: ctx-grpc, containerPort: 9100}
  - {name: ctx-admin, containerPort: 9101}
{{- else }}
  - {name: gen-grpc, containerPort: 9200}
  - {name: gen-admin, containerPort: 9201}
  {{- if not $pair }}
  - {name: gen-data, containerPort: 9202}
  {{- end }}
{{- end }}
{{- include "kvferry.probes" (list $ (ternary "ctx-admin" "gen-admin" (eq $role "ctxserver"))) | nindent 0 }}
resources:
  {{- toYaml $v.resources | nindent 2 }}
securityContext:
  {{- include "kvferry.securityContext" $ | nindent 2 }}
volumeMounts:
  {{- include "kvferry.mounts" (list $ $role) | nindent 2 }}
  {{- if $pair }}
  - {name: shm, mountPath: /run/kvferry}
  {{- end }}
{{- end -}}
