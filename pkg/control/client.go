package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// Client talks to a control socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the control socket at path. Nothing is
// dialled until the first call.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		// One short-lived CLI call at a time: no pool worth keeping.
		DisableKeepAlives:     true,
		ResponseHeaderTimeout: 0, // drains stream for as long as they run
	}
	return &Client{path: path, hc: &http.Client{Transport: tr}}
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// callTimeout bounds every call but drain: status and set answer at once,
// flush within a segment write.
const callTimeout = 2 * time.Minute

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode request: %w", err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://writeboost"+path, rd)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var eb errorBody
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			return nil, &RemoteError{Code: resp.StatusCode, Msg: eb.Error}
		}
		return nil, &RemoteError{Code: resp.StatusCode, Msg: string(bytes.TrimSpace(b))}
	}
	return resp, nil
}

// dialError turns the usual "nobody is there" errors into advice.
func (c *Client) dialError(err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist), errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("control socket %s does not exist: is `writeboost serve` running (see its --control flag)?", c.path)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("control socket %s refused the connection: the server that made it has stopped", c.path)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("control socket %s: permission denied (the socket is private to the user running the server)", c.path)
	}
	return fmt.Errorf("control socket %s: %w", c.path, err)
}

// RemoteError is an error reported by the server.
type RemoteError struct {
	Code int // HTTP status
	Msg  string
}

func (e *RemoteError) Error() string { return e.Msg }

func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode %s reply: %w", path, err)
	}
	return nil
}

// Status returns the engine's status.
func (c *Client) Status(ctx context.Context) (engine.Status, error) {
	var st engine.Status
	err := c.call(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// StatusRaw returns the status exactly as the server encoded it, so the
// CLI's --json output carries every key even from a newer server.
func (c *Client) StatusRaw(ctx context.Context) (json.RawMessage, error) {
	var raw json.RawMessage
	err := c.call(ctx, http.MethodGet, "/v1/status", nil, &raw)
	return raw, err
}

// Set changes tunables, all or none: the server validates every setting
// before applying any. It returns the tunables now in force.
func (c *Client) Set(ctx context.Context, settings []Setting) (engine.Tunables, error) {
	var t engine.Tunables
	err := c.call(ctx, http.MethodPost, "/v1/set", SetRequest{Settings: settings}, &t)
	return t, err
}

// ClearStat resets the hit/miss counters.
func (c *Client) ClearStat(ctx context.Context) error {
	return c.call(ctx, http.MethodPost, "/v1/clear_stat", struct{}{}, nil)
}

// Flush makes every write acknowledged so far durable.
func (c *Client) Flush(ctx context.Context) error {
	return c.call(ctx, http.MethodPost, "/v1/flush", struct{}{}, nil)
}

// Drain asks the server to write back everything and calls progress with
// each update it streams. It returns nil once nothing is dirty; cancelling
// ctx stops the drain on the server.
func (c *Client) Drain(ctx context.Context, progress func(engine.DrainProgress)) error {
	resp, err := c.do(ctx, http.MethodPost, "/v1/drain", struct{}{})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 4096), 1<<20)
	for sc.Scan() {
		var ev DrainEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("decode drain progress: %w", err)
		}
		switch {
		case ev.Error != "":
			return &RemoteError{Code: http.StatusInternalServerError, Msg: "drain: " + ev.Error}
		case ev.Done:
			return nil
		case ev.Progress != nil && progress != nil:
			progress(*ev.Progress)
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("drain: reading progress: %w", err)
	}
	return errors.New("drain: the server closed the stream before the drain finished (did it shut down?)")
}

// ParseSettings parses KEY=VALUE arguments. Dashes in KEY are accepted
// for underscores, so the flag spelling of serve works too.
func ParseSettings(args []string) ([]Setting, error) {
	out := make([]Setting, 0, len(args))
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%q is not KEY=VALUE", a)
		}
		out = append(out, Setting{Name: strings.ReplaceAll(k, "-", "_"), Value: v})
	}
	return out, nil
}
