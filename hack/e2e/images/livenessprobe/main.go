// Command livenessprobe is the e2e's stand-in for the livenessprobe
// sidecar (the module proxy refuses the chart's pinned version). Like the
// official one it serves /healthz on --http-endpoint and answers each
// request with the plugin's CSI Probe over --csi-address: 200 when the
// plugin says it is ready, 500 with the reason otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
)

func main() {
	klog.InitFlags(nil)
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI socket of the plugin, inside this container")
	endpoint := flag.String("http-endpoint", ":9808", "address of /healthz")
	timeout := flag.Duration("probe-timeout", time.Second, "timeout of each Probe call")
	flag.Parse()
	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		klog.Fatal(err)
	}
	defer conn.Close()
	id := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *timeout)
		defer cancel()
		resp, err := id.Probe(ctx, &csi.ProbeRequest{})
		switch {
		case err != nil:
			klog.ErrorS(err, "health check failed")
			http.Error(w, fmt.Sprintf("probe: %v", err), http.StatusInternalServerError)
		case resp.GetReady() != nil && !resp.GetReady().GetValue():
			http.Error(w, "driver responded but is not ready", http.StatusInternalServerError)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	klog.InfoS("serving /healthz", "address", *endpoint, "csi", *csiAddress)
	klog.Fatal(http.ListenAndServe(*endpoint, nil))
}
