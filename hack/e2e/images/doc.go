// Package images holds the small programs the e2e cluster needs that no
// registry can give it here: ociimage assembles image tarballs with
// go-containerregistry (no Docker engine, no registry); pause is the pod
// sandbox's process; registrar and livenessprobe are stand-ins for
// csi-node-driver-registrar and livenessprobe, whose modules the Go module
// proxy refuses at the versions the chart pins. The stand-ins talk to the
// kubelet and the plugin through the same interfaces as the official
// sidecars (kubelet plugin registration over a socket in plugins_registry;
// CSI Identity over the plugin's socket), take the same flags the chart
// passes, and sit at the same paths in their images. The chart keeps the
// official images; only the e2e uses these.
//
// This is a module of its own so the repository's module does not take on
// the kubelet API and go-containerregistry.
package images
