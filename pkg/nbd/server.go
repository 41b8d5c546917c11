package nbd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Config tunes a Server; zero values pick the defaults.
type Config struct {
	// MaxInFlightBytes bounds the payload bytes (WRITE data received,
	// READ data to send) held per connection. Default 64 MiB.
	MaxInFlightBytes int64
	// MaxInFlightRequests bounds the requests in flight per connection.
	// Default 256 (the Linux driver keeps at most 128 per connection).
	MaxInFlightRequests int
	// HandshakeTimeout bounds the whole negotiation. Default 30 s.
	HandshakeTimeout time.Duration
	// NoInline runs every request on its own goroutine, even small ones
	// to a fast backend (see conn), for backends whose latency is
	// bimodal enough that holding up one connection behind a slow
	// request is worse than the per-request scheduling cost.
	NoInline bool
}

// Server serves exports over NBD (fixed newstyle, simple replies).
type Server struct {
	cfg Config

	mu struct {
		sync.Mutex
		exports   map[string]*exportState
		listeners map[net.Listener]struct{}
		conns     map[*conn]struct{}
	}
	closing atomic.Bool
	connWG  sync.WaitGroup
}

// NewServer returns a server with no exports.
func NewServer(cfg Config) *Server {
	if cfg.MaxInFlightBytes <= 0 {
		cfg.MaxInFlightBytes = 64 << 20
	}
	if cfg.MaxInFlightBytes < MaxPayload {
		cfg.MaxInFlightBytes = MaxPayload // one maximal request must fit
	}
	if cfg.MaxInFlightRequests <= 0 {
		cfg.MaxInFlightRequests = 256
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	s := &Server{cfg: cfg}
	s.mu.exports = make(map[string]*exportState)
	s.mu.listeners = make(map[net.Listener]struct{})
	s.mu.conns = make(map[*conn]struct{})
	return s
}

// AddExport registers an export; its backend's capabilities are read now.
func (s *Server) AddExport(e Export) error {
	if e.Backend == nil {
		return fmt.Errorf("nbd: export %q has no backend", e.Name)
	}
	if len(e.Name) > 4096 || len(e.Description) > 4096 {
		return fmt.Errorf("nbd: export %q: name or description longer than 4096 bytes", e.Name)
	}
	if e.Backend.Size() < 0 {
		return fmt.Errorf("nbd: export %q: negative size", e.Name)
	}
	st := newExportState(e)
	if !validBlockSizes(st.minBS, st.prefBS, st.maxBS) {
		return fmt.Errorf("nbd: export %q: block sizes %d/%d/%d must be powers of two, 512 <= minimum <= preferred <= maximum",
			e.Name, st.minBS, st.prefBS, st.maxBS)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.mu.exports[e.Name]; ok {
		return fmt.Errorf("nbd: export %q already exists", e.Name)
	}
	s.mu.exports[e.Name] = st
	return nil
}

// RemoveExport stops offering an export to new clients. Connected clients
// keep it until they disconnect.
func (s *Server) RemoveExport(name string) {
	s.mu.Lock()
	delete(s.mu.exports, name)
	s.mu.Unlock()
}

func validBlockSizes(min, pref, max uint32) bool {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	return min >= 512 && pow2(min) && pow2(pref) && min <= pref && pref <= max
}

func (s *Server) lookupExport(name string) *exportState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.exports[name]
}

func (s *Server) exportNames() []string {
	s.mu.Lock()
	names := make([]string, 0, len(s.mu.exports))
	for n := range s.mu.exports {
		names = append(names, n)
	}
	s.mu.Unlock()
	sort.Strings(names)
	return names
}

func (s *Server) shuttingDown() bool { return s.closing.Load() }

// Serve accepts connections on l until Shutdown (then it returns
// ErrServerClosed) or an accept error. It closes l on return.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.mu.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.mu.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		backoff = 0
		c := newConn(s, nc)
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		s.mu.conns[c] = struct{}{}
		s.connWG.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.connWG.Done()
			c.serve()
			s.mu.Lock()
			delete(s.mu.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Shutdown stops accepting connections, lets each connection finish and
// reply to the requests it has already read, then closes it. Requests that
// arrive meanwhile get no reply (the client sends them again to the next
// server; see conn.readLoop). If ctx ends first, the connections are
// closed at once and ctx's error is returned; requests already handed to a
// backend may then still be running when Shutdown returns.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing.Store(true)
	for l := range s.mu.listeners {
		l.Close()
	}
	for c := range s.mu.conns {
		c.stopReading()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.mu.conns {
			c.nc.Close()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}

// ListenUnix listens on a unix socket at path with the given permissions
// (0600 when mode is 0). A stale socket file left by a dead server is
// replaced; a live one, or a file that is not a socket, is an error.
// The socket is created under a private name and renamed into place, so it
// is never reachable with looser permissions than mode.
func ListenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if mode == 0 {
		mode = 0o600
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("nbd: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("nbd: %s: a server is already listening", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("nbd: remove stale socket: %w", err)
		}
		klog.InfoS("Removed stale NBD socket", "path", path)
	} else if !os.IsNotExist(err) {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".nbdsock-")
	if err != nil {
		return nil, fmt.Errorf("nbd: temp dir for socket: %w", err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("nbd: listen: %w", err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("nbd: chmod socket: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("nbd: place socket: %w", err)
	}
	return &unixListener{UnixListener: ul, path: path}, nil
}

// unixListener removes its socket file on Close.
type unixListener struct {
	*net.UnixListener
	path string
	once sync.Once
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() { os.Remove(l.path) })
	return err
}
