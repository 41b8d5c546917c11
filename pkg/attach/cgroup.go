package attach

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// Leaving the pod's cgroups.
//
// On the nbdfuse path the device lives in processes (nbdfuse and the relay
// it runs), not in the kernel. Started by the CSI plugin they belong to the
// plugin container, and deleting or restarting the plugin pod kills every
// process of the container: with its own PID namespace the kernel kills
// them when the container's init exits, and with the host's (hostPID, as
// the chart asks) the runtime kills every process left in the container's
// cgroups. Either way each mounted filesystem on the device then fails.
// So once nbdfuse and the relay are up, they are moved out of the pod's
// cgroups into one cgroup of their own, a sibling of the kubelet's pod root
// in every hierarchy ("kubepods" -> "writeboost-csi-attach"), where the
// runtime does not look; the relay then reconnects to the next plugin's
// server and the filesystem carries on. Outside a pod (no "kubepods" in
// our cgroup paths, e.g. `writeboost attach` on a host) nothing moves.
// JuiceFS's and Mountpoint-S3's CSI drivers solve the same problem with
// separate mount pods or host systemd units; a cgroup of our own needs
// neither a Kubernetes client nor systemd on the node.

// AttachCgroup is the cgroup, beside the kubelet's pod root, that holds the
// fallback path's processes once they leave the pod.
const AttachCgroup = "writeboost-csi-attach"

// cgroupLine is one line of /proc/PID/cgroup: a hierarchy (controllers, or
// "" for cgroup2) and the process's path in it.
type cgroupLine struct {
	controllers string
	path        string
}

// cgroupMount is a cgroup filesystem mount from /proc/self/mountinfo: which
// hierarchy (controllers; "" for cgroup2), the subtree it shows (root) and
// where.
type cgroupMount struct {
	controllers string
	root        string
	point       string
}

func parseCgroups(b []byte) []cgroupLine {
	var out []cgroupLine
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		out = append(out, cgroupLine{controllers: f[1], path: f[2]})
	}
	return out
}

// parseCgroupMounts reads mountinfo lines: "ID PARENT MAJ:MIN ROOT POINT
// OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS".
func parseCgroupMounts(b []byte) []cgroupMount {
	var out []cgroupMount
	for _, l := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(l, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 {
			continue
		}
		m := cgroupMount{root: unescapeMountPath(f[3]), point: unescapeMountPath(f[4])}
		switch g[0] {
		case "cgroup2":
		case "cgroup":
			// The hierarchy's controllers are its super options less the
			// generic ones, in /proc/PID/cgroup's order (the kernel's).
			var ctrls []string
			for _, o := range strings.Split(g[2], ",") {
				switch {
				case o == "rw", o == "ro", o == "noprefix", o == "clone_children", o == "xattr",
					o == "cpuset_v2_mode", o == "favordynmods", strings.HasPrefix(o, "release_agent="):
				default:
					ctrls = append(ctrls, o)
				}
			}
			m.controllers = strings.Join(ctrls, ",")
		default:
			continue
		}
		out = append(out, m)
	}
	return out
}

// sameControllers compares two comma-separated controller lists as sets.
func sameControllers(a, b string) bool {
	as, bs := strings.Split(a, ","), strings.Split(b, ",")
	if len(as) != len(bs) {
		return false
	}
	seen := map[string]bool{}
	for _, c := range as {
		seen[c] = true
	}
	for _, c := range bs {
		if !seen[c] {
			return false
		}
	}
	return true
}

// attachCgroupDirs maps our cgroups (lines) to the directories of the
// attach cgroup in every hierarchy, through the cgroup mounts we can see.
// No "kubepods" component in any path: not in a pod, nothing to leave (nil).
func attachCgroupDirs(lines []cgroupLine, mounts []cgroupMount) ([]string, error) {
	var dirs []string
	var errs []error
	for _, l := range lines {
		parts := strings.Split(l.path, "/")
		i := 0
		for i < len(parts) && !strings.HasPrefix(parts[i], "kubepods") {
			i++
		}
		if i == len(parts) {
			continue
		}
		target := path.Join("/", path.Join(parts[:i]...), AttachCgroup)
		dir := ""
		// Newest mounts first, and only the one on top at each mount point:
		// a container may see the runtime's view of its own subtree and the
		// host's whole hierarchy mounted over it (or under it).
		covered := map[string]bool{}
		for k := len(mounts) - 1; k >= 0; k-- {
			m := mounts[k]
			if covered[m.point] {
				continue
			}
			covered[m.point] = true
			if !sameControllers(m.controllers, l.controllers) {
				continue
			}
			if rel, ok := strings.CutPrefix(target, strings.TrimSuffix(m.root, "/")+"/"); ok {
				dir = filepath.Join(m.point, rel)
				break
			}
		}
		if dir == "" {
			errs = append(errs, fmt.Errorf("cgroup hierarchy %q: no mount shows %s (give the plugin the host's /sys/fs/cgroup)", l.controllers, target))
			continue
		}
		dirs = append(dirs, dir)
	}
	return dirs, errors.Join(errs...)
}

// leavePodCgroups moves the processes pids (whole thread groups) into the
// attach cgroup of every hierarchy. Not in a pod: a no-op.
func leavePodCgroups(pids []int) error { return leaveCgroupsOf("self", pids) }

// leaveCgroupsOf is leavePodCgroups for the pod of process ref ("self", or
// a pid in tests).
func leaveCgroupsOf(ref string, pids []int) error {
	self, err := os.ReadFile("/proc/" + ref + "/cgroup")
	if err != nil {
		return err
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	dirs, err := attachCgroupDirs(parseCgroups(self), parseCgroupMounts(mi))
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, d := range dirs {
		if err := mkdirCgroup(d); err != nil {
			errs = append(errs, fmt.Errorf("attach cgroup: %w", err))
			continue
		}
		for _, pid := range pids {
			if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
				errs = append(errs, fmt.Errorf("move process %d to %s: %w", pid, d, err))
			}
		}
	}
	return errors.Join(errs...)
}

// mkdirCgroup makes cgroup directory d and its missing parents. A new v1
// cpuset cgroup has no CPUs and no memory nodes and refuses processes
// (ENOSPC) until given some: each new level inherits its parent's, as the
// runtimes do.
func mkdirCgroup(d string) error {
	if _, err := os.Stat(d); err == nil {
		return nil
	}
	if err := mkdirCgroup(filepath.Dir(d)); err != nil {
		return err
	}
	if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
		cur, err := os.ReadFile(filepath.Join(d, f))
		if err != nil || len(strings.TrimSpace(string(cur))) > 0 {
			continue // not a v1 cpuset, or already set
		}
		parent, err := os.ReadFile(filepath.Join(filepath.Dir(d), f))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(d, f), parent, 0o644); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(d, f), err)
		}
	}
	return nil
}

// processTree is pid and its descendants, from /proc's parent links.
func processTree(pid int) []int {
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
		s := string(b)
		j := strings.LastIndexByte(s, ')')
		if j < 0 {
			continue
		}
		f := strings.Fields(s[j+1:])
		if len(f) < 2 {
			continue
		}
		if pp, err := strconv.Atoi(f[1]); err == nil {
			children[pp] = append(children[pp], p)
		}
	}
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}
