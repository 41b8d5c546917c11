// Command registrar is the e2e's stand-in for csi-node-driver-registrar
// (the module proxy refuses the chart's pinned version). It does the same
// job through the same kubelet interface: it asks the CSI plugin for its
// name over --csi-address, serves the kubelet's plugin registration API
// (pluginregistration/v1) on <plugin-registration-path>/<name>-reg.sock,
// and answers with the socket path the kubelet sees
// (--kubelet-registration-path). It exits if the kubelet rejects the
// registration, recreates its socket if it disappears, and, like the
// official sidecar, checks in --mode=kubelet-registration-probe that the
// kubelet accepted it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// registeredMark is written once the kubelet has accepted the plugin; the
// probe mode checks it (the official sidecar keeps the same kind of mark).
const registeredMark = "/kubelet-registered"

func main() {
	klog.InitFlags(nil)
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI socket of the plugin, inside this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the plugin's CSI socket as the kubelet sees it on the node")
	regDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry directory, inside this container")
	mode := flag.String("mode", "registration", "registration, or kubelet-registration-probe")
	timeout := flag.Duration("timeout", time.Second, "timeout of each CSI call")
	flag.Parse()
	if *kubeletPath == "" {
		klog.Fatal("--kubelet-registration-path is required")
	}
	if *mode == "kubelet-registration-probe" {
		if _, err := os.Stat(registeredMark); err != nil {
			fmt.Fprintln(os.Stderr, "not registered with the kubelet:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	name, err := pluginName(ctx, *csiAddress, *timeout)
	if err != nil {
		klog.Fatalf("asking the plugin for its name: %v", err)
	}
	sock := filepath.Join(*regDir, name+"-reg.sock")
	klog.InfoS("registering with the kubelet", "driver", name, "endpoint", *kubeletPath, "socket", sock)
	if err := serve(ctx, sock, &registrar{name: name, endpoint: *kubeletPath}); err != nil {
		klog.Fatal(err)
	}
}

// pluginName calls GetPluginInfo, waiting for the socket to come up.
func pluginName(ctx context.Context, addr string, timeout time.Duration) (string, error) {
	conn, err := grpc.NewClient("unix://"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	for {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(cctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			if info.GetName() == "" {
				return "", errors.New("GetPluginInfo returned no name")
			}
			return info.GetName(), nil
		}
		klog.InfoS("plugin not ready", "address", addr, "err", err)
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// serve listens on sock until ctx ends, recreating the socket if someone
// removes it (the kubelet then sees a new socket and registers again).
func serve(ctx context.Context, sock string, r *registrar) error {
	for {
		_ = os.Remove(sock)
		l, err := net.Listen("unix", sock)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", sock, err)
		}
		srv := grpc.NewServer()
		registerapi.RegisterRegistrationServer(srv, r)
		go func() { _ = srv.Serve(l) }()
		gone := false
		for !gone {
			select {
			case <-ctx.Done():
				srv.Stop()
				_ = os.Remove(sock)
				return nil
			case <-time.After(10 * time.Second):
				if _, err := os.Lstat(sock); err != nil {
					klog.InfoS("registration socket removed; recreating it", "socket", sock)
					gone = true
				}
			}
		}
		srv.Stop()
	}
}

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		_ = os.Remove(registeredMark)
		klog.ErrorS(nil, "the kubelet rejected the registration; exiting", "error", st.Error)
		os.Exit(1)
	}
	klog.InfoS("registered with the kubelet", "driver", r.name)
	if err := os.WriteFile(registeredMark, nil, 0o644); err != nil {
		klog.ErrorS(err, "writing the registration mark")
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
