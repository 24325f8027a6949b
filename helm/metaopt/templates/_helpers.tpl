{{/*
Names. One release is one job's stack, so objects are RELEASE-COMPONENT. RELEASE is cut to 39
characters because KubeRay refuses longer names: a RayJob's name may have 47 characters
(RELEASE-workers) and a RayCluster's 53 (RELEASE-raycluster), so that the names KubeRay derives
from them stay 63-character DNS labels.
*/}}
{{- define "metaopt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metaopt.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 39 | trimSuffix "-" }}
{{- end }}

{{- define "metaopt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metaopt.learnerName" -}}
{{- printf "%s-learner" (include "metaopt.fullname" .) }}
{{- end }}

{{- define "metaopt.rayClusterName" -}}
{{- printf "%s-raycluster" (include "metaopt.fullname" .) }}
{{- end }}

{{- define "metaopt.redisName" -}}
{{- printf "%s-redis" (include "metaopt.fullname" .) }}
{{- end }}

{{- define "metaopt.jobConfigMapName" -}}
{{- printf "%s-job" (include "metaopt.fullname" .) }}
{{- end }}

{{/* The job id: job.id, else the release name (a DNS label, so a valid job id). */}}
{{- define "metaopt.jobId" -}}
{{- default .Release.Name .Values.job.id }}
{{- end }}

{{/* Labels. Call the selector helpers with (dict "ctx" $ "component" "learner"). */}}
{{- define "metaopt.labels" -}}
helm.sh/chart: {{ include "metaopt.chart" . }}
app.kubernetes.io/name: {{ include "metaopt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metaopt
metaopt.io/job-id: {{ regexReplaceAll "[-._]+$" (include "metaopt.jobId" . | trunc 63) "" | quote }}
{{- end }}

{{- define "metaopt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metaopt.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "metaopt.componentLabels" -}}
{{ include "metaopt.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images: the CPU image (learner, head, submitter) and the CUDA image (GPU workers). */}}
{{- define "metaopt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "metaopt.cudaImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.image.cudaTag) }}
{{- end }}

{{- define "metaopt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metaopt.learnerName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secrets: the job token, and Redis's password (empty name: no password). */}}
{{- define "metaopt.tokenSecretName" -}}
{{- default (printf "%s-token" (include "metaopt.fullname" .)) .Values.token.existingSecret }}
{{- end }}

{{- define "metaopt.tokenSecretKey" -}}
{{- if .Values.token.existingSecret }}{{ .Values.token.key }}{{ else }}token{{ end }}
{{- end }}

{{- define "metaopt.redisSecretName" -}}
{{- if .Values.redis.bundled.enabled }}
{{- default (include "metaopt.redisName" .) .Values.redis.bundled.existingSecret }}
{{- else if .Values.redis.external.url }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "metaopt.redisSecretKey" -}}
{{- if .Values.redis.bundled.enabled }}
{{- if .Values.redis.bundled.existingSecret }}{{ .Values.redis.bundled.passwordKey }}{{ else }}password{{ end }}
{{- else }}
{{- .Values.redis.external.passwordKey }}
{{- end }}
{{- end }}

{{/* The job store URL: the bundled Redis's, the external one, or empty (none). */}}
{{- define "metaopt.jobStoreURL" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://metaopt@%s:6379/0" (include "metaopt.redisName" .) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/*
The job spec (job.specYaml if set, else job.spec) with storage.job_store filled in from `redis`
where the user left it unset.
*/}}
{{- define "metaopt.jobSpec" -}}
{{- $spec := deepCopy (.Values.job.spec | default dict) }}
{{- if .Values.job.specYaml }}
{{- $spec = fromYaml .Values.job.specYaml }}
{{- if hasKey $spec "Error" }}
{{- fail (printf "job.specYaml is not a YAML mapping: %s" (get $spec "Error")) }}
{{- end }}
{{- end }}
{{- $storage := deepCopy (get $spec "storage" | default dict) }}
{{- $url := include "metaopt.jobStoreURL" . }}
{{- if and $url (not (get $storage "job_store")) }}
{{- $_ := set $storage "job_store" $url }}
{{- end }}
{{- if $storage }}
{{- $_ := set $spec "storage" $storage }}
{{- end }}
{{- toYaml $spec }}
{{- end }}

{{/* Paths inside the metaopt containers. */}}
{{- define "metaopt.jobFile" -}}/etc/metaopt/job.yaml{{- end }}
{{- define "metaopt.tokenFile" -}}/var/run/metaopt/token/token{{- end }}
{{- define "metaopt.tlsDir" -}}/var/run/metaopt/tls{{- end }}

{{/*
Environment for object storage, from storage.existingSecret (keys by reference, never by value)
and the endpoint and region, which are not secret.
*/}}
{{- define "metaopt.storageEnv" -}}
{{- with .Values.storage }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- if .endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes every metaopt pod mounts: the job spec, the token, /tmp. */}}
{{- define "metaopt.commonVolumes" -}}
- name: job
  configMap:
    name: {{ include "metaopt.jobConfigMapName" . }}
- name: token
  secret:
    secretName: {{ include "metaopt.tokenSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "metaopt.tokenSecretKey" . }}
        path: token
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "metaopt.commonVolumeMounts" -}}
- name: job
  mountPath: /etc/metaopt
  readOnly: true
- name: token
  mountPath: /var/run/metaopt/token
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Checks that span several values (the schema checks each value alone). */}}
{{- define "metaopt.validate" -}}
{{- if not (regexMatch "^[a-z]" (include "metaopt.fullname" .)) }}
{{- fail (printf "the release name %q starts with a digit, and KubeRay needs RayCluster and RayJob names that start with a letter: set fullnameOverride" .Release.Name) }}
{{- end }}
{{- if and .Values.redis.bundled.enabled .Values.redis.external.url }}
{{- fail "redis: set either redis.bundled.enabled=true or redis.external.url, not both (set redis.bundled.enabled=false to use an external Redis)" }}
{{- end }}
{{- if and .Values.redis.external.url (not .Values.redis.bundled.enabled) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.external.existingSecret is empty: name the Secret that holds the password of the user in redis.external.url (key redis.external.passwordKey)" }}
{{- end }}
{{- if .Values.learner.tls.enabled }}
{{- if not .Values.learner.tls.existingSecret }}
{{- fail "learner.tls.enabled=true needs learner.tls.existingSecret: a Secret with tls.crt and tls.key (and ca.crt with learner.tls.mutual=true)" }}
{{- end }}
{{- if and .Values.rayJob.enabled (not .Values.learner.tls.workersSecret) }}
{{- fail "learner.tls.enabled=true needs learner.tls.workersSecret: a Secret with ca.crt, the CA of the learner's certificate, for the workers" }}
{{- end }}
{{- end }}
{{- with .Values.rayCluster.gcsFaultTolerance }}
{{- if and .enabled (not .redisAddress) (not $.Values.redis.bundled.enabled) }}
{{- fail "rayCluster.gcsFaultTolerance.enabled=true without the bundled Redis needs rayCluster.gcsFaultTolerance.redisAddress (HOST:PORT of a Redis for the GCS's state, with redisUsername and existingSecret for its login)" }}
{{- end }}
{{- end }}
{{- with .Values.rayCluster.workers }}
{{- if or (gt (int .minReplicas) (int .replicas)) (gt (int .replicas) (int .maxReplicas)) }}
{{- fail (printf "rayCluster.workers: need minReplicas <= replicas <= maxReplicas, got %d, %d, %d" (int .minReplicas) (int .replicas) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Ray containers' environment: HOME for a read-only root, storage, extraEnv. */}}
{{- define "metaopt.rayEnv" -}}
- name: HOME
  value: /tmp
{{- if .ctx.Values.storage.inRayPods }}
{{- include "metaopt.storageEnv" .ctx }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Ray pods' volumes: the common ones, /dev/shm for the object store, the workers' TLS. */}}
{{- define "metaopt.rayVolumes" -}}
{{ include "metaopt.commonVolumes" .ctx }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .sharedMemorySize }}
{{- if .ctx.Values.learner.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .ctx.Values.learner.tls.workersSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "metaopt.rayVolumeMounts" -}}
{{ include "metaopt.commonVolumeMounts" . }}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.learner.tls.enabled }}
- name: tls
  mountPath: {{ include "metaopt.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}
