#!/usr/bin/env bash
# Builds the Kubernetes binaries of the e2e cluster from k8s.io/kubernetes at
# KUBERNETES_VERSION, through the Go module proxy, into a cache outside the
# repository keyed by version: $E2E_CACHE/kubernetes-<version>/bin.
#
# The module k8s.io/kubernetes on the proxy lacks staging/src (those are the
# separate k8s.io/<name> modules its go.mod replaces with ./staging/src/...),
# so `go install .../cmd/kubelet@version` fails. This copies the module to a
# writable tree, fills staging/src from the staging modules at the matching
# v0.x version, and builds there with the go.work switched off.
set -euo pipefail
. "$(dirname "$0")/env.sh"

out="$E2E_CACHE/kubernetes-$KUBERNETES_VERSION"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
have=1
for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || have=0; done
if [ "$have" = 1 ]; then
	echo "e2e: kubernetes $KUBERNETES_VERSION binaries cached in $out/bin"
	exit 0
fi

export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
staging_version="v0.${KUBERNETES_VERSION#v1.}"
src="$out/src"
rm -rf "$src" "$out/bin.tmp"
mkdir -p "$out"
echo "e2e: fetching k8s.io/kubernetes@$KUBERNETES_VERSION"
dir=$(cd "$out" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$dir" ] || { echo "e2e: k8s.io/kubernetes@$KUBERNETES_VERSION not downloaded" >&2; exit 1; }
cp -r "$dir" "$src"
chmod -R u+w "$src"
mapfile -t staging < <(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => \./staging/src/k8s.io/.*#\1#p' "$src/go.mod" | sort -u)
[ "${#staging[@]}" -gt 0 ] || { echo "e2e: no staging replace lines in go.mod" >&2; exit 1; }
echo "e2e: fetching ${#staging[@]} staging modules at $staging_version"
for m in "${staging[@]}"; do
	d=$(cd "$out" && go mod download -json "$m@$staging_version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
	[ -d "$d" ] || { echo "e2e: $m@$staging_version not downloaded" >&2; exit 1; }
	rm -rf "$src/staging/src/$m"
	mkdir -p "$(dirname "$src/staging/src/$m")"
	cp -r "$d" "$src/staging/src/$m"
	chmod -R u+w "$src/staging/src/$m"
done

minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
	ldflags+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
echo "e2e: building ${bins[*]} (several minutes cold)"
start=$SECONDS
mkdir -p "$out/bin.tmp"
(cd "$src" && nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out/bin.tmp/" $(printf './cmd/%s ' "${bins[@]}"))
rm -rf "$out/bin" && mv "$out/bin.tmp" "$out/bin"
rm -rf "$src"
echo "e2e: kubernetes $KUBERNETES_VERSION built in $((SECONDS - start)) s"
