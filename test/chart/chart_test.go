// Package chart tests the Helm chart charts/writeboost-csi and the manifests
// rendered from it under deploy/: helm lint and helm template with the
// default and a non-default values file; every rendered object decoded
// strictly (unknown fields fail) into its k8s.io/api type; the plugin
// container's arguments parsed by the plugin's own command; the config file
// loaded by the plugin's own loader; the StorageClass parameters accepted by
// the plugin's own parser (pkg/params), so the chart cannot drift from the
// driver; the sidecars' flags; deploy/ equal to a fresh render.
package chart

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"go/build"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"github.com/writeboost-csi/writeboost-csi/pkg/driver"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
	wbpool "github.com/writeboost-csi/writeboost-csi/pkg/pool"
	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

const (
	repoRoot   = "../.."
	chartDir   = repoRoot + "/charts/writeboost-csi"
	kubeVer    = "1.33.0" // must match hack/manifests.sh
	pluginBin  = "/usr/local/bin/writeboost"
	driverName = "writeboost.csi.io"
)

// helm finds the pinned helm of hack/deps.sh (GOPATH/bin) or one on PATH.
func helm(t *testing.T) string {
	t.Helper()
	p := filepath.Join(build.Default.GOPATH, "bin", "helm")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	testenv.RequireTools(t, "helm")
	p, _ = exec.LookPath("helm")
	return p
}

func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String(), nil
}

func render(t *testing.T, args ...string) (string, error) {
	t.Helper()
	a := append([]string{"template", "wb", chartDir, "--namespace", "storage", "--kube-version", kubeVer}, args...)
	return run(t, helm(t), a...)
}

// monitor holds exactly the fields the chart sets on a ServiceMonitor or
// PodMonitor (their types are not in k8s.io/api): decoding with unknown
// fields disallowed catches a typo in any of them.
type monitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames"`
		} `json:"namespaceSelector"`
		Endpoints           []monitorEndpoint `json:"endpoints,omitempty"`
		PodMetricsEndpoints []monitorEndpoint `json:"podMetricsEndpoints,omitempty"`
	} `json:"spec"`
}

type monitorEndpoint struct {
	Port        string `json:"port"`
	Path        string `json:"path"`
	Interval    string `json:"interval"`
	Relabelings []struct {
		SourceLabels []string `json:"sourceLabels"`
		TargetLabel  string   `json:"targetLabel"`
	} `json:"relabelings"`
}

// objects is one render, by kind, every object strictly decoded.
type objects struct {
	daemonSets      []*appsv1.DaemonSet
	configMaps      map[string]*corev1.ConfigMap
	storageClasses  []*storagev1.StorageClass
	csiDrivers      []*storagev1.CSIDriver
	serviceAccounts []*corev1.ServiceAccount
	services        []*corev1.Service
	clusterRoles    map[string]*rbacv1.ClusterRole
	crBindings      []*rbacv1.ClusterRoleBinding
	roles           map[string]*rbacv1.Role
	roleBindings    []*rbacv1.RoleBinding
	pvcs            []*corev1.PersistentVolumeClaim
	pods            []*corev1.Pod
	monitors        []*monitor
}

// strictDecode converts one YAML document to JSON (duplicate keys are
// errors) and decodes it with unknown fields disallowed.
func strictDecode(doc []byte, into any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	d := json.NewDecoder(bytes.NewReader(j))
	d.DisallowUnknownFields()
	if err := d.Decode(into); err != nil {
		return err
	}
	if d.More() {
		return errors.New("trailing data after the object")
	}
	return nil
}

func splitDocs(s string) [][]byte {
	var docs [][]byte
	for _, d := range strings.Split("\n"+s, "\n---") {
		if strings.TrimSpace(stripComments(d)) != "" {
			docs = append(docs, []byte(d))
		}
	}
	return docs
}

func stripComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func decodeAll(t *testing.T, rendered string) *objects {
	t.Helper()
	o := &objects{configMaps: map[string]*corev1.ConfigMap{}, clusterRoles: map[string]*rbacv1.ClusterRole{}, roles: map[string]*rbacv1.Role{}}
	for i, doc := range splitDocs(rendered) {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			t.Fatalf("document %d: %v\n%s", i, err, doc)
		}
		var into any
		gvk := head.APIVersion + "/" + head.Kind
		switch gvk {
		case "apps/v1/DaemonSet":
			v := &appsv1.DaemonSet{}
			o.daemonSets, into = append(o.daemonSets, v), v
		case "v1/ConfigMap":
			v := &corev1.ConfigMap{}
			into = v
			defer func() { o.configMaps[v.Name] = v }()
		case "storage.k8s.io/v1/StorageClass":
			v := &storagev1.StorageClass{}
			o.storageClasses, into = append(o.storageClasses, v), v
		case "storage.k8s.io/v1/CSIDriver":
			v := &storagev1.CSIDriver{}
			o.csiDrivers, into = append(o.csiDrivers, v), v
		case "v1/ServiceAccount":
			v := &corev1.ServiceAccount{}
			o.serviceAccounts, into = append(o.serviceAccounts, v), v
		case "v1/Service":
			v := &corev1.Service{}
			o.services, into = append(o.services, v), v
		case "rbac.authorization.k8s.io/v1/ClusterRole":
			v := &rbacv1.ClusterRole{}
			into = v
			defer func() { o.clusterRoles[v.Name] = v }()
		case "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
			v := &rbacv1.ClusterRoleBinding{}
			o.crBindings, into = append(o.crBindings, v), v
		case "rbac.authorization.k8s.io/v1/Role":
			v := &rbacv1.Role{}
			into = v
			defer func() { o.roles[v.Name] = v }()
		case "rbac.authorization.k8s.io/v1/RoleBinding":
			v := &rbacv1.RoleBinding{}
			o.roleBindings, into = append(o.roleBindings, v), v
		case "v1/PersistentVolumeClaim":
			v := &corev1.PersistentVolumeClaim{}
			o.pvcs, into = append(o.pvcs, v), v
		case "v1/Pod":
			v := &corev1.Pod{}
			o.pods, into = append(o.pods, v), v
		case "monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor":
			v := &monitor{}
			o.monitors, into = append(o.monitors, v), v
		default:
			t.Fatalf("document %d: unexpected object %s", i, gvk)
		}
		if err := strictDecode(doc, into); err != nil {
			t.Fatalf("document %d (%s) does not decode strictly: %v\n%s", i, gvk, err, doc)
		}
	}
	return o
}

func container(t *testing.T, ds *appsv1.DaemonSet, name string) *corev1.Container {
	t.Helper()
	for i := range ds.Spec.Template.Spec.Containers {
		if c := &ds.Spec.Template.Spec.Containers[i]; c.Name == name {
			return c
		}
	}
	t.Fatalf("DaemonSet %s: no container %q", ds.Name, name)
	return nil
}

func volumeByName(t *testing.T, ds *appsv1.DaemonSet, name string) *corev1.Volume {
	t.Helper()
	for i := range ds.Spec.Template.Spec.Volumes {
		if v := &ds.Spec.Template.Spec.Volumes[i]; v.Name == name {
			return v
		}
	}
	t.Fatalf("DaemonSet %s: no volume %q", ds.Name, name)
	return nil
}

// hostMount returns the mount of c at mountPath and the hostPath behind it.
func hostMount(t *testing.T, ds *appsv1.DaemonSet, c *corev1.Container, mountPath string) (corev1.VolumeMount, string) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if filepath.Clean(m.MountPath) == filepath.Clean(mountPath) {
			v := volumeByName(t, ds, m.Name)
			if v.HostPath == nil {
				return m, ""
			}
			return m, v.HostPath.Path
		}
	}
	t.Fatalf("DaemonSet %s, container %s: nothing mounted at %s", ds.Name, c.Name, mountPath)
	return corev1.VolumeMount{}, ""
}

func fieldRefEnv(t *testing.T, c *corev1.Container, name, fieldPath string) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == name {
			if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != fieldPath {
				t.Errorf("container %s: env %s is not the downward API field %s", c.Name, name, fieldPath)
			}
			return
		}
	}
	t.Errorf("container %s: no env %s (downward API %s)", c.Name, name, fieldPath)
}

// pluginFlags parses the plugin container's arguments with the plugin's own
// command (plus klog's flags, which cmd/writeboost adds to its root), so an
// unknown or misspelt flag fails here, not on a node.
func pluginFlags(t *testing.T, args []string) *driver.Config {
	t.Helper()
	cmd := driver.NewCommand("test")
	if len(args) == 0 || args[0] != cmd.Name() {
		t.Fatalf("plugin args %q do not start with the %q command", args, cmd.Name())
	}
	fs := cmd.Flags()
	kfs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(kfs)
	fs.AddGoFlagSet(kfs)
	if err := fs.Parse(args[1:]); err != nil {
		t.Fatalf("plugin args %q: %v", args, err)
	}
	if fs.NArg() != 0 {
		t.Fatalf("plugin args %q: stray arguments %q", args, fs.Args())
	}
	get := func(n string) string { return fs.Lookup(n).Value.String() }
	mv, _ := strconv.Atoi(get("max-volumes"))
	return &driver.Config{Endpoint: get("endpoint"), NodeID: get("node-id"), ConfigFile: get("config"),
		HDDPool: get("hdd-pool"), NVMePool: get("nvme-pool"), StateDir: get("state-dir"), RunDir: get("run-dir"),
		MetricsAddress: get("metrics-address"), HealthAddress: get("health-address"), MaxVolumes: mv}
}

// prestopFlags parses the preStop hook with the plugin's `csi prestop`.
func prestopFlags(t *testing.T, command []string) (stateDir, runDir string, timeout time.Duration) {
	t.Helper()
	if len(command) < 3 || command[0] != pluginBin || command[1] != "csi" || command[2] != "prestop" {
		t.Fatalf("preStop %q is not %s csi prestop ...", command, pluginBin)
	}
	cmd, _, err := driver.NewCommand("test").Find([]string{"prestop"})
	if err != nil || cmd.Name() != "prestop" {
		t.Fatalf("no prestop subcommand: %v", err)
	}
	fs := cmd.Flags()
	if err := fs.Parse(command[3:]); err != nil {
		t.Fatalf("preStop %q: %v", command, err)
	}
	d, err := time.ParseDuration(fs.Lookup("timeout").Value.String())
	if err != nil {
		t.Fatal(err)
	}
	return fs.Lookup("state-dir").Value.String(), fs.Lookup("run-dir").Value.String(), d
}

// argSet turns --flag=value arguments into a map (a bare --flag maps to "").
func argSet(args []string) map[string]string {
	m := map[string]string{}
	for _, a := range args {
		k, v, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		m[k] = v
	}
	return m
}

func wantArgs(t *testing.T, c *corev1.Container, want map[string]string) {
	t.Helper()
	got := argSet(c.Args)
	for k, v := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("container %s: missing --%s (args %q)", c.Name, k, c.Args)
		} else if g != v {
			t.Errorf("container %s: --%s=%q, want %q", c.Name, k, g, v)
		}
	}
}

// pinned fails unless image names a fixed tag (no latest, no missing tag).
func pinned(t *testing.T, image string) {
	t.Helper()
	i := strings.LastIndex(image, ":")
	if i < 0 || strings.Contains(image[i:], "/") || image[i+1:] == "" || image[i+1:] == "latest" {
		t.Errorf("image %q is not pinned to a tag", image)
	}
}

// pool is one expected pool of a node group.
type pool struct{ kind, path, vg string }

type group struct {
	name         string
	nodeSelector map[string]string
	hdd, nvme    pool
}

// expect is what a values file should produce.
type expect struct {
	kubeletDir, stateDir, runDir string
	maxVolumes                   int
	memoryBudget                 string   // "" = derived from the memory limit
	noZeroFree                   []string // pools (group/role) rendered with zeroFreeSpace: false
	groups                       []group
	metricsPort                  int // 0: metrics off
	storageClasses               []string
	image                        string
	serviceAccount               string
	grace                        int64
}

// checkRender asserts everything the issue requires of one render.
func checkRender(t *testing.T, o *objects, e expect) {
	t.Helper()
	// CSIDriver.
	if len(o.csiDrivers) != 1 {
		t.Fatalf("%d CSIDriver objects, want 1", len(o.csiDrivers))
	}
	cd := o.csiDrivers[0]
	if cd.Name != driverName || cd.Spec.AttachRequired == nil || *cd.Spec.AttachRequired ||
		cd.Spec.PodInfoOnMount == nil || !*cd.Spec.PodInfoOnMount ||
		cd.Spec.StorageCapacity == nil || !*cd.Spec.StorageCapacity ||
		cd.Spec.FSGroupPolicy == nil || *cd.Spec.FSGroupPolicy != storagev1.FileFSGroupPolicy ||
		!slices.Equal(cd.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) {
		t.Errorf("CSIDriver spec wrong: %+v", cd.Spec)
	}

	// StorageClasses: every one accepted by the plugin's parser.
	var scNames []string
	for _, sc := range o.storageClasses {
		scNames = append(scNames, sc.Name)
		if sc.Provisioner != driverName || sc.VolumeBindingMode == nil || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer ||
			sc.AllowVolumeExpansion == nil || !*sc.AllowVolumeExpansion {
			t.Errorf("StorageClass %s: provisioner %q, binding %v, expansion %v", sc.Name, sc.Provisioner, sc.VolumeBindingMode, sc.AllowVolumeExpansion)
		}
		if _, err := params.Parse(sc.Parameters); err != nil {
			t.Errorf("StorageClass %s: the plugin rejects its parameters: %v", sc.Name, err)
		}
	}
	if !slices.Equal(scNames, e.storageClasses) {
		t.Errorf("StorageClasses %q, want %q", scNames, e.storageClasses)
	}

	// ServiceAccount and the bindings of the sidecars' roles to it.
	if len(o.serviceAccounts) != 1 || o.serviceAccounts[0].Name != e.serviceAccount || o.serviceAccounts[0].Namespace != "storage" {
		t.Fatalf("want one ServiceAccount storage/%s, got %d", e.serviceAccount, len(o.serviceAccounts))
	}
	checkRBAC(t, o, e.serviceAccount)

	// DaemonSets, one per node group.
	if len(o.daemonSets) != len(e.groups) {
		t.Fatalf("%d DaemonSets, want %d (one per node group)", len(o.daemonSets), len(e.groups))
	}
	for i, ds := range o.daemonSets {
		checkDaemonSet(t, o, ds, e, e.groups[i])
	}
	if len(o.daemonSets) > 1 {
		a, b := o.daemonSets[0].Spec.Selector.MatchLabels, o.daemonSets[1].Spec.Selector.MatchLabels
		if fmt.Sprint(a) == fmt.Sprint(b) {
			t.Errorf("two DaemonSets share the selector %v", a)
		}
	}

	// Metrics objects.
	if e.metricsPort == 0 {
		if len(o.services) != 0 || len(o.monitors) != 0 {
			t.Errorf("metrics off, yet %d Services and %d monitors rendered", len(o.services), len(o.monitors))
		}
		return
	}
	if len(o.services) != 1 || len(o.monitors) != 2 {
		t.Fatalf("metrics on: %d Services and %d monitors, want 1 and 2", len(o.services), len(o.monitors))
	}
	svc := o.services[0]
	if svc.Spec.ClusterIP != corev1.ClusterIPNone || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != int32(e.metricsPort) ||
		svc.Spec.Ports[0].TargetPort.StrVal != "metrics" {
		t.Errorf("metrics Service spec: %+v", svc.Spec)
	}
	for _, ds := range o.daemonSets {
		if !selects(svc.Spec.Selector, ds.Spec.Template.Labels) {
			t.Errorf("metrics Service selector %v misses the pods of %s (%v)", svc.Spec.Selector, ds.Name, ds.Spec.Template.Labels)
		}
	}
	for _, m := range o.monitors {
		eps := append(m.Spec.Endpoints, m.Spec.PodMetricsEndpoints...)
		if len(eps) != 1 || eps[0].Port != "metrics" || eps[0].Path != "/metrics" {
			t.Errorf("%s endpoints: %+v", m.Kind, eps)
		}
		target := svc.Labels
		if m.Kind == "PodMonitor" {
			target = o.daemonSets[0].Spec.Template.Labels
		}
		if !selects(m.Spec.Selector.MatchLabels, target) {
			t.Errorf("%s selector %v does not select %v", m.Kind, m.Spec.Selector.MatchLabels, target)
		}
		if !slices.Equal(m.Spec.NamespaceSelector.MatchNames, []string{"storage"}) {
			t.Errorf("%s namespaceSelector %v", m.Kind, m.Spec.NamespaceSelector.MatchNames)
		}
	}
}

func selects(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func checkRBAC(t *testing.T, o *objects, sa string) {
	t.Helper()
	has := func(rules []rbacv1.PolicyRule, group, resource string, verbs ...string) bool {
		for _, r := range rules {
			if slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) {
				for _, v := range verbs {
					if !slices.Contains(r.Verbs, v) {
						return false
					}
				}
				return true
			}
		}
		return false
	}
	var clusterRules, nsRules []rbacv1.PolicyRule
	for _, b := range o.crBindings {
		if len(b.Subjects) != 1 || b.Subjects[0].Name != sa || b.Subjects[0].Namespace != "storage" {
			t.Errorf("ClusterRoleBinding %s binds %v, not storage/%s", b.Name, b.Subjects, sa)
		}
		cr, ok := o.clusterRoles[b.RoleRef.Name]
		if !ok || b.RoleRef.Kind != "ClusterRole" {
			t.Fatalf("ClusterRoleBinding %s refers to a missing role %v", b.Name, b.RoleRef)
		}
		clusterRules = append(clusterRules, cr.Rules...)
	}
	for _, b := range o.roleBindings {
		r, ok := o.roles[b.RoleRef.Name]
		if !ok || b.RoleRef.Kind != "Role" || len(b.Subjects) != 1 || b.Subjects[0].Name != sa {
			t.Fatalf("RoleBinding %s: role %v subjects %v", b.Name, b.RoleRef, b.Subjects)
		}
		nsRules = append(nsRules, r.Rules...)
	}
	for _, c := range []struct {
		group, resource string
		verbs           []string
	}{
		{"", "persistentvolumes", []string{"get", "list", "watch", "create", "delete", "patch"}},
		{"", "persistentvolumeclaims", []string{"get", "list", "watch", "update"}},
		{"", "persistentvolumeclaims/status", []string{"patch"}},
		{"storage.k8s.io", "storageclasses", []string{"get", "list", "watch"}},
		{"storage.k8s.io", "csinodes", []string{"get", "list", "watch"}},
		{"", "nodes", []string{"get", "list", "watch"}},
		{"", "events", []string{"create", "patch"}},
		{"storage.k8s.io", "volumeattachments", []string{"get", "list", "watch"}},
		{"", "pods", []string{"get", "list", "watch"}},
	} {
		if !has(clusterRules, c.group, c.resource, c.verbs...) {
			t.Errorf("no cluster rule grants %v on %s/%s", c.verbs, c.group, c.resource)
		}
	}
	if !has(nsRules, "storage.k8s.io", "csistoragecapacities", "get", "list", "watch", "create", "update", "patch", "delete") ||
		!has(nsRules, "", "pods", "get") || !has(nsRules, "apps", "replicasets", "get") {
		t.Errorf("namespace rules lack capacity tracking (csistoragecapacities, pods/replicasets get): %+v", nsRules)
	}
}

func checkDaemonSet(t *testing.T, o *objects, ds *appsv1.DaemonSet, e expect, g group) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if ds.Namespace != "storage" || !selects(ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels) {
		t.Errorf("DaemonSet %s: namespace %q, selector %v vs pod labels %v", ds.Name, ds.Namespace, ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels)
	}
	// Without the host's network namespace older kernels hide the nbd
	// netlink family and volumes lose their reconnectable devices.
	if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("DaemonSet %s: hostNetwork %v dnsPolicy %q", ds.Name, spec.HostNetwork, spec.DNSPolicy)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("DaemonSet %s: priorityClassName %q", ds.Name, spec.PriorityClassName)
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil || us.RollingUpdate.MaxUnavailable == nil ||
		us.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("DaemonSet %s: updateStrategy %+v, want RollingUpdate maxUnavailable 1", ds.Name, us)
	}
	if spec.ServiceAccountName != e.serviceAccount {
		t.Errorf("DaemonSet %s: serviceAccountName %q", ds.Name, spec.ServiceAccountName)
	}
	for k, v := range g.nodeSelector {
		if spec.NodeSelector[k] != v {
			t.Errorf("DaemonSet %s: nodeSelector %v lacks %s=%s", ds.Name, spec.NodeSelector, k, v)
		}
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds != e.grace {
		t.Errorf("DaemonSet %s: terminationGracePeriodSeconds %v, want %d", ds.Name, spec.TerminationGracePeriodSeconds, e.grace)
	}
	names := []string{}
	for _, c := range spec.Containers {
		names = append(names, c.Name)
		pinned(t, c.Image)
		if c.Name != "writeboost" && !strings.HasPrefix(c.Image, "registry.k8s.io/sig-storage/") {
			t.Errorf("sidecar %s image %q is not an upstream sig-storage image", c.Name, c.Image)
		}
	}
	if want := []string{"writeboost", "node-driver-registrar", "csi-provisioner", "csi-resizer", "liveness-probe"}; !slices.Equal(names, want) {
		t.Errorf("DaemonSet %s: containers %q, want %q", ds.Name, names, want)
	}

	// The plugin container.
	p := container(t, ds, "writeboost")
	if p.Image != e.image {
		t.Errorf("plugin image %q, want %q", p.Image, e.image)
	}
	if len(p.Command) != 0 {
		t.Errorf("plugin container overrides the image's ENTRYPOINT with %q", p.Command)
	}
	if p.SecurityContext == nil || p.SecurityContext.Privileged == nil || !*p.SecurityContext.Privileged {
		t.Errorf("plugin container is not privileged")
	}
	cfg := pluginFlags(t, p.Args)
	if cfg.Endpoint != "unix:///csi/csi.sock" || cfg.NodeID != "$(NODE_NAME)" || cfg.MaxVolumes != e.maxVolumes ||
		cfg.StateDir != e.stateDir || cfg.RunDir != e.runDir || cfg.HDDPool != "" || cfg.NVMePool != "" {
		t.Errorf("plugin flags: %+v", cfg)
	}
	fieldRefEnv(t, p, "NODE_NAME", "spec.nodeName")
	if e.metricsPort == 0 && cfg.MetricsAddress != "" {
		t.Errorf("metrics off, yet --metrics-address=%q", cfg.MetricsAddress)
	}
	if e.metricsPort != 0 {
		if cfg.MetricsAddress != fmt.Sprintf(":%d", e.metricsPort) {
			t.Errorf("--metrics-address=%q, want :%d", cfg.MetricsAddress, e.metricsPort)
		}
		if !hasPort(p, "metrics", e.metricsPort) {
			t.Errorf("plugin container has no port metrics=%d", e.metricsPort)
		}
	}

	// The socket, kubelet and host mounts.
	sock, sockHost := hostMount(t, ds, p, "/csi")
	if want := filepath.Join(e.kubeletDir, "plugins", driverName); sockHost != want {
		t.Errorf("socket dir on the host %q, want %q", sockHost, want)
	}
	_ = sock
	for _, d := range []string{"pods", "plugins"} {
		m, h := hostMount(t, ds, p, filepath.Join(e.kubeletDir, d))
		if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional || h != filepath.Join(e.kubeletDir, d) {
			t.Errorf("kubelet %s dir: host %q propagation %v, want Bidirectional", d, h, m.MountPropagation)
		}
	}
	for _, d := range []string{"/dev", "/sys", "/lib/modules"} {
		m, h := hostMount(t, ds, p, d)
		if h != d {
			t.Errorf("%s mounted from host %q", d, h)
		}
		if d == "/lib/modules" && !m.ReadOnly {
			t.Errorf("/lib/modules is not read-only")
		}
	}
	if _, h := hostMount(t, ds, p, e.stateDir); h != e.stateDir {
		t.Errorf("state dir from host %q, want %q (must survive pod restarts)", h, e.stateDir)
	}
	if _, h := hostMount(t, ds, p, e.runDir); h != e.runDir {
		t.Errorf("run dir from host %q, want %q (RAM buffers outlive the pod)", h, e.runDir)
	}
	for _, pl := range []pool{g.hdd, g.nvme} {
		if pl.kind != "directory" {
			continue
		}
		m, h := hostMount(t, ds, p, pl.path)
		if h != pl.path {
			t.Errorf("pool %s mounted from host %q", pl.path, h)
		}
		if v := volumeByName(t, ds, m.Name); v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
			t.Errorf("pool %s: hostPath type %v, want Directory (never created on the root disk)", pl.path, v.HostPath.Type)
		}
	}

	// The config file: loaded by the plugin's own loader.
	cm, ch := hostMountConfig(t, ds, p, filepath.Dir(cfg.ConfigFile))
	file, ok := o.configMaps[cm]
	if !ok {
		t.Fatalf("DaemonSet %s mounts ConfigMap %q, which is not rendered", ds.Name, cm)
	}
	_ = ch
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(file.Data[filepath.Base(cfg.ConfigFile)]), 0o600); err != nil {
		t.Fatal(err)
	}
	fc, err := driver.LoadFileConfig(path)
	if err != nil {
		t.Fatalf("ConfigMap %s: the plugin rejects its config: %v", cm, err)
	}
	for _, c := range []struct {
		got  *struct{ kind, path, vg string }
		want pool
	}{
		{&struct{ kind, path, vg string }{fc.Pools.HDD.Kind, fc.Pools.HDD.Path, fc.Pools.HDD.VolumeGroup}, g.hdd},
		{&struct{ kind, path, vg string }{fc.Pools.NVMe.Kind, fc.Pools.NVMe.Path, fc.Pools.NVMe.VolumeGroup}, g.nvme},
	} {
		if c.got.kind != c.want.kind || c.got.path != c.want.path || c.got.vg != c.want.vg {
			t.Errorf("ConfigMap %s pool %+v, want %+v", cm, *c.got, c.want)
		}
	}
	if fc.MaxVolumes != e.maxVolumes {
		t.Errorf("config maxVolumes %d, want %d", fc.MaxVolumes, e.maxVolumes)
	}
	if fc.MemoryBudget != e.memoryBudget {
		t.Errorf("config memoryBudget %q, want %q", fc.MemoryBudget, e.memoryBudget)
	}
	for role, pc := range map[string]*wbpool.Config{"hdd": fc.Pools.HDD, "nvme": fc.Pools.NVMe} {
		want := !slices.Contains(e.noZeroFree, g.name+"/"+role)
		if got := pc.ZeroFreeSpace == nil || *pc.ZeroFreeSpace; pc.Kind == "lvm" && got != want {
			t.Errorf("group %s pool %s: zeroFreeSpace %v, want %v", g.name, role, got, want)
		}
	}

	// preStop flushes the very state the plugin uses, within the grace period.
	if p.Lifecycle == nil || p.Lifecycle.PreStop == nil || p.Lifecycle.PreStop.Exec == nil {
		t.Fatalf("plugin container has no preStop exec hook")
	}
	sd, rd, timeout := prestopFlags(t, p.Lifecycle.PreStop.Exec.Command)
	if sd != cfg.StateDir || rd != cfg.RunDir {
		t.Errorf("preStop state/run dirs %q %q differ from the plugin's %q %q", sd, rd, cfg.StateDir, cfg.RunDir)
	}
	if timeout <= 0 || timeout >= time.Duration(e.grace)*time.Second {
		t.Errorf("preStop timeout %v not below terminationGracePeriodSeconds %d", timeout, e.grace)
	}

	// Liveness and readiness: the plugin's probes hit the livenessprobe
	// sidecar's /healthz (which calls the plugin's CSI Probe).
	lp := container(t, ds, "liveness-probe")
	lpArgs := argSet(lp.Args)
	_, port, _ := strings.Cut(lpArgs["http-endpoint"], ":")
	healthPort, _ := strconv.Atoi(port)
	if lpArgs["csi-address"] != "/csi/csi.sock" || healthPort == 0 || !hasPort(p, "healthz", healthPort) {
		t.Errorf("livenessprobe args %q vs plugin ports %+v", lp.Args, p.Ports)
	}
	// A restarted plugin is not ready while its volumes recover: the
	// startupProbe must hold the liveness probe off for longer than the
	// liveness probe's own budget, so recovery is never killed half-way.
	if sp, lp := p.StartupProbe, p.LivenessProbe; sp == nil || lp == nil ||
		sp.PeriodSeconds*sp.FailureThreshold < 10*(lp.InitialDelaySeconds+lp.PeriodSeconds*lp.FailureThreshold) {
		t.Errorf("startup probe %+v does not cover a slow recovery (liveness %+v)", sp, lp)
	}
	for what, pr := range map[string]*corev1.Probe{"liveness": p.LivenessProbe, "readiness": p.ReadinessProbe, "startup": p.StartupProbe} {
		if pr == nil || pr.HTTPGet == nil || pr.HTTPGet.Path != "/healthz" || pr.HTTPGet.Port.StrVal != "healthz" {
			t.Errorf("plugin %s probe is not /healthz on port healthz: %+v", what, pr)
		}
	}

	// Sidecars.
	reg := container(t, ds, "node-driver-registrar")
	wantArgs(t, reg, map[string]string{"csi-address": "/csi/csi.sock", "kubelet-registration-path": filepath.Join(sockHost, "csi.sock")})
	if _, h := hostMount(t, ds, reg, "/registration"); h != filepath.Join(e.kubeletDir, "plugins_registry") {
		t.Errorf("registrar registration dir from host %q", h)
	}
	prov := container(t, ds, "csi-provisioner")
	wantArgs(t, prov, map[string]string{"csi-address": "/csi/csi.sock", "node-deployment": "true", "feature-gates": "Topology=true",
		"enable-capacity": "", "capacity-ownerref-level": "0", "strict-topology": ""})
	fieldRefEnv(t, prov, "NODE_NAME", "spec.nodeName")
	fieldRefEnv(t, prov, "NAMESPACE", "metadata.namespace")
	fieldRefEnv(t, prov, "POD_NAMESPACE", "metadata.namespace")
	fieldRefEnv(t, prov, "POD_NAME", "metadata.name")
	wantArgs(t, container(t, ds, "csi-resizer"), map[string]string{"csi-address": "/csi/csi.sock"})
	for _, c := range spec.Containers {
		if c.Name == "writeboost" {
			continue
		}
		if m, _ := hostMount(t, ds, &c, "/csi"); m.Name != sock.Name {
			t.Errorf("sidecar %s does not share the plugin's socket dir", c.Name)
		}
	}
}

func hostMountConfig(t *testing.T, ds *appsv1.DaemonSet, c *corev1.Container, dir string) (configMap, mountPath string) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if filepath.Clean(m.MountPath) == dir {
			v := volumeByName(t, ds, m.Name)
			if v.ConfigMap == nil {
				t.Fatalf("%s is not a ConfigMap volume", dir)
			}
			return v.ConfigMap.Name, m.MountPath
		}
	}
	t.Fatalf("the plugin's config dir %s is not mounted", dir)
	return "", ""
}

func hasPort(c *corev1.Container, name string, port int) bool {
	for _, p := range c.Ports {
		if p.Name == name && int(p.ContainerPort) == port {
			return true
		}
	}
	return false
}

func TestLint(t *testing.T) {
	h := helm(t)
	for _, args := range [][]string{nil, {"-f", "testdata/values-custom.yaml"}} {
		a := append([]string{"lint", "--strict", "--kube-version", kubeVer, chartDir}, args...)
		if _, err := run(t, h, a...); err != nil {
			t.Error(err)
		}
	}
}

func TestDefaultValues(t *testing.T) {
	out, err := render(t)
	if err != nil {
		t.Fatal(err)
	}
	o := decodeAll(t, out)
	checkRender(t, o, expect{
		kubeletDir: "/var/lib/kubelet", stateDir: "/var/lib/writeboost", runDir: "/run/writeboost", maxVolumes: 64,
		groups: []group{{name: "default", nodeSelector: map[string]string{"kubernetes.io/os": "linux"},
			hdd:  pool{kind: "directory", path: "/mnt/hdd/writeboost"},
			nvme: pool{kind: "directory", path: "/mnt/nvme/writeboost"}}},
		storageClasses: []string{driverName}, image: "ghcr.io/writeboost-csi/writeboost-csi:0.1.0",
		serviceAccount: "wb-writeboost-csi", grace: 300,
	})

	// The default StorageClass lists every tunable the plugin knows (cacheSize
	// and ramBufferSize stay out: the configured fraction and the engine's
	// default, which follows the slice's size, apply), at the engine's
	// defaults.
	sc := o.storageClasses[0]
	for _, k := range params.Keys() {
		if _, ok := sc.Parameters[k]; !ok && k != params.KeyCacheSize && k != params.KeyRAMBufferSize {
			t.Errorf("default StorageClass lacks the parameter %q", k)
		}
	}
	v, err := params.Parse(sc.Parameters)
	if err != nil {
		t.Fatal(err)
	}
	if v.Tunables != engine.DefaultTunables() {
		t.Errorf("default StorageClass tunables %+v differ from the engine's defaults %+v", v.Tunables, engine.DefaultTunables())
	}
}

func TestCustomValues(t *testing.T) {
	out, err := render(t, "-f", "testdata/values-custom.yaml")
	if err != nil {
		t.Fatal(err)
	}
	o := decodeAll(t, out)
	checkRender(t, o, expect{
		kubeletDir: "/var/lib/k0s/kubelet", stateDir: "/var/lib/wb-state", runDir: "/run/wb", maxVolumes: 16,
		memoryBudget: "3Gi", noZeroFree: []string{"lvm/nvme"},
		groups: []group{
			{name: "hdd-dirs", nodeSelector: map[string]string{"storage.example.com/tier": "dirs", "kubernetes.io/arch": "amd64"},
				hdd: pool{kind: "directory", path: "/srv/hdd"}, nvme: pool{kind: "directory", path: "/srv/nvme"}},
			{name: "lvm", nodeSelector: map[string]string{"storage.example.com/tier": "lvm", "kubernetes.io/arch": "amd64"},
				hdd: pool{kind: "lvm", vg: "vg-hdd"}, nvme: pool{kind: "lvm", vg: "vg-nvme"}},
		},
		metricsPort:    9900,
		storageClasses: []string{"writeboost-hdd", "writeboost-db", "writeboost-plain"},
		image:          "registry.example.com/storage/writeboost:v9.9.9",
		serviceAccount: "wb-sa", grace: 600,
	})
	sc := o.storageClasses[0]
	v, err := params.Parse(sc.Parameters)
	if err != nil {
		t.Fatal(err)
	}
	if v.FSType != "xfs" || v.CacheSize != 2<<30 {
		t.Errorf("tuned StorageClass parsed as fstype %q cacheSize %d", v.FSType, v.CacheSize)
	}
	if sc.ReclaimPolicy == nil || *sc.ReclaimPolicy != corev1.PersistentVolumeReclaimRetain ||
		sc.Annotations["storageclass.kubernetes.io/is-default-class"] != "true" || !slices.Equal(sc.MountOptions, []string{"noatime"}) {
		t.Errorf("StorageClass %s: reclaim %v annotations %v mountOptions %v", sc.Name, sc.ReclaimPolicy, sc.Annotations, sc.MountOptions)
	}
	if len(o.storageClasses[2].Parameters) != 0 {
		t.Errorf("StorageClass with no parameters rendered %v", o.storageClasses[2].Parameters)
	}
}

// TestParserCatchesBadParameters proves the StorageClass check can fail: a
// value outside the engine's range renders (the chart does not duplicate the
// ranges) and is then refused by the plugin's parser, naming the key.
func TestParserCatchesBadParameters(t *testing.T) {
	out, err := render(t, "--set", "storageClass.parameters.writebackThreshold=101")
	if err != nil {
		t.Fatal(err)
	}
	o := decodeAll(t, out)
	_, err = params.Parse(o.storageClasses[0].Parameters)
	var pe *params.Error
	if !errors.As(err, &pe) || pe.Key != params.KeyWritebackThreshold {
		t.Fatalf("params.Parse = %v, want an error naming writebackThreshold", err)
	}
	out, err = render(t, "--set", "storageClass.parameters.cacheSzie=1Gi")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := params.Parse(decodeAll(t, out).storageClasses[0].Parameters); !errors.As(err, &pe) || pe.Key != "cacheSzie" {
		t.Fatalf("misspelt key: params.Parse = %v", err)
	}
}

// TestBadValuesFailRender: mistakes in pool values stop the render with a
// message naming the value, instead of a pod that fails on the node.
func TestBadValuesFailRender(t *testing.T) {
	for _, c := range []struct{ set, want string }{
		{"nodeGroups[0].name=x,nodeGroups[0].pools.hdd.kind=zfs,nodeGroups[0].pools.nvme.kind=directory,nodeGroups[0].pools.nvme.path=/n", `pools.hdd.kind "zfs"`},
		{"nodeGroups[0].name=x,nodeGroups[0].pools.hdd.kind=lvm,nodeGroups[0].pools.nvme.kind=directory,nodeGroups[0].pools.nvme.path=/n", "kind lvm needs volumeGroup"},
		{"nodeGroups[0].name=x,nodeGroups[0].pools.hdd.kind=directory,nodeGroups[0].pools.hdd.path=rel,nodeGroups[0].pools.nvme.kind=directory,nodeGroups[0].pools.nvme.path=/n", "must be absolute"},
		{"nodeGroups[0].name=x,nodeGroups[0].pools.hdd.kind=directory,nodeGroups[0].pools.hdd.path=/n,nodeGroups[0].pools.nvme.kind=directory,nodeGroups[0].pools.nvme.path=/n/", "share the path"},
		{"nodeGroups[0].name=Bad_Name", "must be lowercase"},
		{"nodeGroups=null", "at least one group"},
		{"metrics.serviceMonitor.enabled=true,metrics.enabled=true", "needs metrics.service.enabled"},
		{"metrics.podMonitor.enabled=true", "need metrics.enabled"},
	} {
		_, err := render(t, "--set", c.set)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("--set %s: err %v, want one containing %q", c.set, err, c.want)
		}
	}
}

// TestDeployUpToDate fails when deploy/writeboost-csi.yaml differs from a
// fresh render by hack/manifests.sh (run `make manifests`).
func TestDeployUpToDate(t *testing.T) {
	h := helm(t)
	testenv.RequireTools(t, "bash", "go")
	fresh := filepath.Join(t.TempDir(), "writeboost-csi.yaml")
	cmd := exec.Command("bash", filepath.Join(repoRoot, "hack/manifests.sh"), fresh)
	cmd.Env = append(os.Environ(), "HELM="+h)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("hack/manifests.sh: %v\n%s", err, out)
	}
	want, err := os.ReadFile(fresh)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(repoRoot, "deploy/writeboost-csi.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("deploy/writeboost-csi.yaml is stale: run `make manifests`")
	}
	// And the committed manifests are themselves sound.
	o := decodeAll(t, string(got))
	if len(o.daemonSets) != 1 || len(o.csiDrivers) != 1 || len(o.storageClasses) != 1 {
		t.Errorf("deploy/: %d DaemonSets, %d CSIDrivers, %d StorageClasses", len(o.daemonSets), len(o.csiDrivers), len(o.storageClasses))
	}
}

// TestExamples decodes deploy/examples strictly; their StorageClass
// parameters pass the plugin's parser and every claim names a StorageClass
// the chart or the examples define.
func TestExamples(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot, "deploy/examples/*.yaml"))
	if err != nil || len(files) < 3 {
		t.Fatalf("examples: %v %v", files, err)
	}
	classes := map[string]bool{driverName: true}
	var all []*objects
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		o := decodeAll(t, string(b))
		all = append(all, o)
		for _, sc := range o.storageClasses {
			classes[sc.Name] = true
			if sc.Provisioner != driverName {
				t.Errorf("%s: StorageClass %s provisioner %q", f, sc.Name, sc.Provisioner)
			}
			if _, err := params.Parse(sc.Parameters); err != nil {
				t.Errorf("%s: StorageClass %s: %v", f, sc.Name, err)
			}
		}
	}
	var block bool
	for _, o := range all {
		for _, pvc := range o.pvcs {
			if pvc.Spec.StorageClassName == nil || !classes[*pvc.Spec.StorageClassName] {
				t.Errorf("PVC %s names an unknown StorageClass", pvc.Name)
			}
			if pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock {
				block = true
			}
		}
	}
	if !block {
		t.Error("no Block-mode PVC among the examples")
	}
}

// TestDockerfileEntrypoint: the image runs the binary the chart's preStop
// calls, directly (no shell).
func TestDockerfileEntrypoint(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `ENTRYPOINT ["`+pluginBin+`"]`) {
		t.Errorf("Dockerfile has no exec-form ENTRYPOINT [%q]", pluginBin)
	}
}

// TestNotes renders NOTES.txt (helm template skips it, so a copy of the
// chart holds it under another name) and checks it names the verification
// commands and every group's pools, with no missing value.
func TestNotes(t *testing.T) {
	h := helm(t)
	dir := filepath.Join(t.TempDir(), "writeboost-csi")
	if err := os.CopyFS(dir, os.DirFS(chartDir)); err != nil {
		t.Fatal(err)
	}
	// helm parses every rendered template as YAML: wrap the notes in a
	// named template and emit it as a block scalar.
	notes, err := os.ReadFile(filepath.Join(dir, "templates/NOTES.txt"))
	if err != nil {
		t.Fatal(err)
	}
	wrap := "{{- define \"notes-test\" -}}\n" + string(notes) + "\n{{- end }}\n"
	if err := os.WriteFile(filepath.Join(dir, "templates/_notes-test.tpl"), []byte(wrap), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "templates/notes-test.yaml"), []byte("notes: |\n{{ include \"notes-test\" . | indent 2 }}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"kubectl get csidriver writeboost.csi.io", "/mnt/hdd/writeboost (directory)", "Metrics are off"}},
		{[]string{"-f", "testdata/values-custom.yaml"}, []string{"vg-hdd (lvm)", "/srv/nvme (directory)", "curl -s localhost:9900/metrics",
			"port-forward ds/wb-writeboost-csi-hdd-dirs 9900", "storageClassName: writeboost-hdd"}},
	} {
		a := append([]string{"template", "wb", dir, "--namespace", "storage", "--kube-version", kubeVer, "--show-only", "templates/notes-test.yaml"}, c.args...)
		rendered, err := run(t, h, a...)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Notes string `json:"notes"`
		}
		if err := strictDecode([]byte(rendered), &doc); err != nil {
			t.Fatal(err)
		}
		out := doc.Notes
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("NOTES lack %q:\n%s", w, out)
			}
		}
		if strings.Contains(out, "<no value>") {
			t.Errorf("NOTES have a missing value:\n%s", out)
		}
	}
}
