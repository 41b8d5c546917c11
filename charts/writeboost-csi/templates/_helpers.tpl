{{/* The driver name is fixed: the plugin registers itself under it. */}}
{{- define "writeboost.driverName" -}}writeboost.csi.io{{- end }}

{{- define "writeboost.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "writeboost.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "writeboost.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "writeboost.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "writeboost.selectorLabels" -}}
app.kubernetes.io/name: {{ include "writeboost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "writeboost.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "writeboost.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: writeboost-csi
{{- end }}

{{- define "writeboost.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "writeboost.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "writeboost.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Plugin socket directory on the node, under the kubelet's plugins dir. */}}
{{- define "writeboost.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "writeboost.driverName" .) }}
{{- end }}

{{/* Checks one pool of a node group; fails the render with a clear message. */}}
{{- define "writeboost.checkPool" -}}
{{- $g := index . 0 }}{{- $role := index . 1 }}{{- $p := index . 2 }}
{{- if not $p }}{{ fail (printf "nodeGroups[%s].pools.%s is required" $g $role) }}{{ end }}
{{- if eq $p.kind "directory" }}
{{- if not $p.path }}{{ fail (printf "nodeGroups[%s].pools.%s: kind directory needs path" $g $role) }}{{ end }}
{{- if not (isAbs $p.path) }}{{ fail (printf "nodeGroups[%s].pools.%s.path %q must be absolute" $g $role $p.path) }}{{ end }}
{{- else if eq $p.kind "lvm" }}
{{- if not $p.volumeGroup }}{{ fail (printf "nodeGroups[%s].pools.%s: kind lvm needs volumeGroup" $g $role) }}{{ end }}
{{- else }}
{{- fail (printf "nodeGroups[%s].pools.%s.kind %q: allowed: directory, lvm" $g $role (toString $p.kind)) }}
{{- end }}
{{- end }}
