// Package control is the runtime control channel of a served cache: the
// small protocol behind `writeboost status`, `set`, `drain`, `clear-stat`
// and `flush`.
//
// A process that runs an engine (`writeboost serve`, and the CSI plugin for
// each staged volume) exposes it with a Server on a unix socket that only
// its owner may open (mode 0600): the socket is the access control, since
// draining or retuning a cache is an operator's act. The protocol is JSON
// over HTTP/1.1 on that socket, so it needs nothing but net/http on either
// side and can be poked at with `curl --unix-socket`:
//
//	GET  /v1/status       engine.Status as JSON (dm-writeboost's snake_case keys)
//	POST /v1/set          {"settings":[{"name":"writeback_threshold","value":"50"}]}
//	POST /v1/drain        streams one JSON object per line: {"progress":{...}}
//	                      ..., then {"done":true} or {"error":"..."}
//	POST /v1/clear_stat   resets the hit/miss counters
//	POST /v1/flush        makes every acknowledged write durable
//
// Errors are JSON objects {"error":"..."} with a 4xx status for bad input
// and 5xx for failures of the engine.
//
// The server side takes a Target interface rather than the engine itself,
// so it is tested with a fake and works for anything that behaves like an
// engine.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// Target is what the control socket controls: an engine.
type Target interface {
	Status() engine.Status
	// SetTunable changes one tunable while running; static ones and bad
	// values are refused with an error.
	SetTunable(name, value string) error
	ClearStat()
	// Drain writes back every dirty block, reporting progress, and returns
	// when nothing is dirty or ctx is done.
	Drain(ctx context.Context, progress func(engine.DrainProgress)) error
	Flush() error
}

// Setting is one KEY=VALUE of a set request.
type Setting struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// SetRequest is the body of POST /v1/set.
type SetRequest struct {
	Settings []Setting `json:"settings"`
}

// DrainEvent is one line of the POST /v1/drain stream.
type DrainEvent struct {
	Progress *engine.DrainProgress `json:"progress,omitempty"`
	Done     bool                  `json:"done,omitempty"`
	Error    string                `json:"error,omitempty"`
}

type errorBody struct {
	Error string `json:"error"`
}

// drainUpdateInterval bounds how often drain progress is sent: enough
// for a smooth progress bar, few enough not to matter on a busy engine.
const drainUpdateInterval = 200 * time.Millisecond

// Server serves the control protocol for one Target.
type Server struct {
	target Target
	http   *http.Server
	// cancel ends the context of every request, so Shutdown stops drains
	// that would otherwise keep it waiting for minutes.
	cancel context.CancelFunc
}

// NewServer returns a server for target.
func NewServer(target Target) *Server {
	base, cancel := context.WithCancel(context.Background())
	s := &Server{target: target, cancel: cancel}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", s.handleStatus)
	mux.HandleFunc("POST /v1/set", s.handleSet)
	mux.HandleFunc("POST /v1/drain", s.handleDrain)
	mux.HandleFunc("POST /v1/clear_stat", s.handleClearStat)
	mux.HandleFunc("POST /v1/flush", s.handleFlush)
	s.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return base },
	}
	return s
}

// Handler returns the HTTP handler (for tests and for embedding).
func (s *Server) Handler() http.Handler { return s.http.Handler }

// Listen creates a unix socket at path that only the current user can
// open. A stale socket left by a killed process is replaced; a socket on
// which another process still answers is refused, so two servers never
// fight over one path.
func Listen(path string) (net.Listener, error) {
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	// Bind under a temporary name, restrict it, then rename it into place:
	// the final path never exists with looser permissions, not even for
	// the instant between bind and chmod.
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	_ = os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on control socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("restrict control socket %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("place control socket %s: %w", path, err)
	}
	return &unlinkListener{UnixListener: ln, path: path}, nil
}

// unlinkListener removes its socket file on Close.
type unlinkListener struct {
	*net.UnixListener
	path string
	once sync.Once
}

func (l *unlinkListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() { os.Remove(l.path) })
	return err
}

// removeStaleSocket removes path when it is a socket nobody answers on.
func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("control socket %s: path exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control socket %s: another process is serving on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("control socket %s: probe: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale control socket %s: %w", path, err)
	}
	return nil
}

// ListenAndServe listens on path (see Listen) and serves until Shutdown.
// It returns once the socket exists; serving runs in the background and
// its terminal error, if any, is logged.
func (s *Server) ListenAndServe(path string) error {
	ln, err := Listen(path)
	if err != nil {
		return err
	}
	go func() {
		if err := s.Serve(ln); err != nil {
			klog.ErrorS(err, "Control socket stopped", "socket", path)
		}
	}()
	return nil
}

// Serve serves connections from ln until Shutdown. It returns nil after a
// Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	err := s.http.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops accepting, cancels drains in progress (their clients see
// an error), and waits for requests to finish or ctx to end.
func (s *Server) Shutdown(ctx context.Context) error {
	s.cancel()
	err := s.http.Shutdown(ctx)
	if err != nil {
		// Force-close what did not finish in time.
		s.http.Close()
	}
	return err
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		klog.V(4).InfoS("Control reply not sent", "err", err)
	}
}

func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, errBadRequest), errors.Is(err, engine.ErrUnknownKey),
		errors.Is(err, engine.ErrStaticTunable), errors.Is(err, syscall.EINVAL):
		code = http.StatusBadRequest
	case errors.Is(err, syscall.ESHUTDOWN):
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, errorBody{Error: err.Error()})
}

var errBadRequest = errors.New("bad request")

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.target.Status())
}

// ValidateSettings checks every setting against engine.TunableSpecs before
// any is applied, so a set with one bad value changes nothing.
func ValidateSettings(settings []Setting) error {
	if len(settings) == 0 {
		return fmt.Errorf("%w: no settings given", errBadRequest)
	}
	var scratch engine.Tunables
	for _, st := range settings {
		spec, ok := engine.LookupTunable(st.Name)
		if !ok {
			return fmt.Errorf("%w: %q (known: %s)", engine.ErrUnknownKey, st.Name, knownTunables())
		}
		if !spec.Online {
			return fmt.Errorf("%w: %s (restart with the new value instead)", engine.ErrStaticTunable, st.Name)
		}
		if err := scratch.Set(st.Name, st.Value); err != nil {
			return fmt.Errorf("%w: %v", errBadRequest, err)
		}
	}
	return nil
}

func knownTunables() string {
	names := make([]string, 0, len(engine.TunableSpecs))
	for _, s := range engine.TunableSpecs {
		names = append(names, s.Name)
	}
	return strings.Join(names, ", ")
}

func (s *Server) handleSet(w http.ResponseWriter, r *http.Request) {
	var req SetRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, fmt.Errorf("%w: decode set request: %v", errBadRequest, err))
		return
	}
	if err := ValidateSettings(req.Settings); err != nil {
		writeError(w, err)
		return
	}
	for _, st := range req.Settings {
		if err := s.target.SetTunable(st.Name, st.Value); err != nil {
			writeError(w, fmt.Errorf("set %s=%s: %w", st.Name, st.Value, err))
			return
		}
		klog.InfoS("Tunable set over the control socket", "name", st.Name, "value", st.Value)
	}
	writeJSON(w, http.StatusOK, s.target.Status().Tunables)
}

func (s *Server) handleClearStat(w http.ResponseWriter, r *http.Request) {
	s.target.ClearStat()
	klog.InfoS("Statistics cleared over the control socket")
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) handleFlush(w http.ResponseWriter, r *http.Request) {
	if err := s.target.Flush(); err != nil {
		writeError(w, fmt.Errorf("flush: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// handleDrain streams progress while the target drains. The engine calls
// the progress function from its own goroutines; it only ever stores the
// latest value, so a slow or stuck client never slows the drain.
func (s *Server) handleDrain(w http.ResponseWriter, r *http.Request) {
	// Consume the (empty) body: only then does net/http watch the
	// connection and cancel r.Context() when the client goes away.
	if _, err := io.Copy(io.Discard, http.MaxBytesReader(w, r.Body, 4096)); err != nil {
		writeError(w, fmt.Errorf("%w: drain request body: %v", errBadRequest, err))
		return
	}
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	send := func(ev DrainEvent) bool {
		if err := enc.Encode(ev); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}

	var (
		mu     sync.Mutex
		latest *engine.DrainProgress
	)
	progress := func(p engine.DrainProgress) {
		mu.Lock()
		latest = &p
		mu.Unlock()
	}
	take := func() *engine.DrainProgress {
		mu.Lock()
		defer mu.Unlock()
		p := latest
		latest = nil
		return p
	}

	// The request context ends when the client goes away (Ctrl-C on
	// `writeboost drain`): the drain stops rather than running unobserved.
	ctx := r.Context()
	done := make(chan error, 1)
	klog.InfoS("Drain started over the control socket")
	go func() { done <- s.target.Drain(ctx, progress) }()

	tick := time.NewTicker(drainUpdateInterval)
	defer tick.Stop()
	clientGone := false
	for {
		select {
		case err := <-done:
			if p := take(); p != nil && !clientGone {
				send(DrainEvent{Progress: p})
			}
			if err != nil {
				klog.ErrorS(err, "Drain failed")
				if !clientGone {
					send(DrainEvent{Error: err.Error()})
				}
				return
			}
			klog.InfoS("Drain finished")
			if !clientGone {
				send(DrainEvent{Done: true})
			}
			return
		case <-tick.C:
			if p := take(); p != nil && !clientGone {
				clientGone = !send(DrainEvent{Progress: p})
			}
		}
	}
}
