// Command ociimage assembles a container image tarball without a Docker
// engine or a registry, with go-containerregistry: layers from existing
// tarballs (a root filesystem) and from files on this machine, an
// entrypoint, labels and environment. The tarball is in `docker save`
// format, which `ctr images import` reads. Layers get a fixed timestamp, so
// the same inputs give the same image.
//
//	ociimage -o out.tar -tag example.local/x:v1 -entrypoint /x \
//	    [-rootfs rootfs.tar] [-file SRC:DST[:MODE]]... [-label K=V]... [-env K=V]...
package main

import (
	"archive/tar"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	var files, labels, env, entrypoint list
	out := flag.String("o", "", "output tarball")
	tag := flag.String("tag", "", "image reference to record in the tarball")
	rootfs := flag.String("rootfs", "", "a tarball of a root filesystem, the first layer")
	flag.Var(&files, "file", "SRC:DST[:MODE] put a file of this machine at DST (one layer for all -file)")
	flag.Var(&labels, "label", "K=V image label")
	flag.Var(&env, "env", "K=V environment variable")
	flag.Var(&entrypoint, "entrypoint", "entrypoint argument (repeat for more)")
	flag.Parse()
	if *out == "" || *tag == "" || len(entrypoint) == 0 {
		fmt.Fprintln(os.Stderr, "ociimage: -o, -tag and -entrypoint are required")
		os.Exit(2)
	}
	if err := build(*out, *tag, *rootfs, files, labels, env, entrypoint); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func build(out, tag, rootfs string, files, labels, env, entrypoint []string) error {
	ref, err := name.NewTag(tag)
	if err != nil {
		return err
	}
	img := empty.Image
	if rootfs != "" {
		l, err := tarball.LayerFromFile(rootfs)
		if err != nil {
			return fmt.Errorf("root filesystem layer: %w", err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			return err
		}
	}
	if len(files) > 0 {
		tmp, err := os.CreateTemp("", "ociimage-*.tar")
		if err != nil {
			return err
		}
		defer os.Remove(tmp.Name())
		if err := writeFilesTar(tmp, files); err != nil {
			tmp.Close()
			return err
		}
		if err := tmp.Close(); err != nil {
			return err
		}
		l, err := tarball.LayerFromFile(tmp.Name())
		if err != nil {
			return err
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			return err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cf.Config.Entrypoint = entrypoint
	cf.Config.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	if len(labels) > 0 {
		cf.Config.Labels = map[string]string{}
		for _, kv := range labels {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("label %q: want K=V", kv)
			}
			cf.Config.Labels[k] = v
		}
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, ref, img); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", out, err)
	}
	return os.Rename(tmp, out)
}

// writeFilesTar writes each SRC:DST[:MODE] with its parent directories.
func writeFilesTar(w io.Writer, files []string) error {
	tw := tar.NewWriter(w)
	epoch := time.Unix(0, 0)
	dirs := map[string]bool{}
	for _, spec := range files {
		parts := strings.Split(spec, ":")
		if len(parts) < 2 || len(parts) > 3 {
			return fmt.Errorf("-file %q: want SRC:DST[:MODE]", spec)
		}
		src, dst := parts[0], strings.TrimPrefix(path.Clean(parts[1]), "/")
		mode := int64(0o755)
		if len(parts) == 3 {
			m, err := strconv.ParseInt(parts[2], 8, 32)
			if err != nil {
				return fmt.Errorf("-file %q: mode: %w", spec, err)
			}
			mode = m
		}
		var parents []string
		for d := path.Dir(dst); d != "." && d != "/"; d = path.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return err
			}
		}
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: dst, Mode: mode, Size: st.Size(), ModTime: epoch}); err != nil {
			f.Close()
			return err
		}
		_, err = io.Copy(tw, f)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", src, err)
		}
	}
	return tw.Close()
}
