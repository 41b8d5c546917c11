package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
)

// The fuzz targets cover both ends of the control socket: the server's
// decoding of set requests (anyone who can open the socket sends them),
// the client's decoding of replies and of the drain stream (a server of
// another version, or something else listening on the path), and the
// CLI's KEY=VALUE arguments.

// cannedTransport answers every request with one fixed reply, so the
// client's decoding is fuzzed without a socket.
type cannedTransport struct {
	code int
	body []byte
}

func (c cannedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		_, _ = io.Copy(io.Discard, req.Body)
		req.Body.Close()
	}
	return &http.Response{
		StatusCode: c.code, Status: http.StatusText(c.code), Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{}, Body: io.NopCloser(bytes.NewReader(c.body)), Request: req,
	}, nil
}

func cannedClient(code int, body []byte) *Client {
	return &Client{path: "fuzz.sock", hc: &http.Client{Transport: cannedTransport{code: code, body: body}}}
}

// replyCode maps a fuzzed number onto 200 (most of the time) or another
// final status, never a redirect (which the client would follow).
func replyCode(n uint16) int {
	switch c := 200 + int(n)%400; {
	case n%3 == 0, c >= 300 && c < 400:
		return http.StatusOK
	default:
		return c
	}
}

func mustJSON(t testing.TB, v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func FuzzSetRequest(f *testing.F) {
	f.Add(mustJSON(f, SetRequest{Settings: []Setting{{"writeback_threshold", "50"}}}))
	f.Add(mustJSON(f, SetRequest{Settings: []Setting{{"writeback_threshold", "0"}, {"nr_max_batched_writeback", "8"},
		{"read_cache_threshold", "127"}, {"sync_data_interval", "3600"}, {"update_sb_record_interval", "1"}}}))
	f.Add(mustJSON(f, SetRequest{Settings: []Setting{{"write_around_mode", "1"}}}))
	f.Add(mustJSON(f, SetRequest{Settings: []Setting{{"writeback_threshold", "50"}, {"colour", "blue"}}}))
	f.Add(mustJSON(f, SetRequest{Settings: []Setting{{"writeback_threshold", "101"}}}))
	f.Add(mustJSON(f, SetRequest{}))
	f.Add([]byte(`{"settings":[{"name":"writeback_threshold","value":"5"}],"extra":1}`))
	f.Add([]byte(`{"settings":[{"name":"writeback_threshold","value":"5"}]} trailing`))
	f.Add([]byte(`{"settings":null}`))
	f.Add([]byte(`[`))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, body []byte) {
		fake := newFake(0)
		before := fake.Status().Tunables
		srv := NewServer(fake)
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodPost, "/v1/set", bytes.NewReader(body))
		srv.Handler().ServeHTTP(rec, req)

		// What the server should have made of the body.
		var want SetRequest
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		decErr := dec.Decode(&want)
		valid := decErr == nil && ValidateSettings(want.Settings) == nil
		if len(body) > 64<<10 {
			// Over the server's limit: whether the first value fits is
			// up to the decoder's buffering; only the status is checked.
			if rec.Code != http.StatusOK && rec.Code != http.StatusBadRequest {
				t.Fatalf("set of %d bytes: status %d", len(body), rec.Code)
			}
			return
		}

		switch rec.Code {
		case http.StatusOK:
			if !valid {
				t.Fatalf("set %q accepted (decode: %v)", body, decErr)
			}
			var got engine.Tunables
			if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatalf("reply %q to set %q is not tunables: %v", rec.Body.Bytes(), body, err)
			}
			if got != fake.Status().Tunables {
				t.Fatalf("reply %+v, target has %+v", got, fake.Status().Tunables)
			}
			if !reflect.DeepEqual(fake.sets, want.Settings) {
				t.Fatalf("set %q applied %v, want %v in order", body, fake.sets, want.Settings)
			}
			// The request re-encodes to one that decodes equal.
			var again SetRequest
			if err := json.Unmarshal(mustJSON(t, want), &again); err != nil || !reflect.DeepEqual(again, want) {
				t.Fatalf("request %+v re-encoded decodes as %+v, %v", want, again, err)
			}
		case http.StatusBadRequest:
			if valid {
				t.Fatalf("valid set %q refused: %s", body, rec.Body.Bytes())
			}
			var eb errorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &eb); err != nil || eb.Error == "" {
				t.Fatalf("refusal of %q is not an error object: %q (%v)", body, rec.Body.Bytes(), err)
			}
			// All or none: a refused set changes nothing.
			if len(fake.sets) != 0 || fake.Status().Tunables != before {
				t.Fatalf("refused set %q still applied %v", body, fake.sets)
			}
		default:
			t.Fatalf("set %q: status %d: %s", body, rec.Code, rec.Body.Bytes())
		}
	})
}

func FuzzClientDrain(f *testing.F) {
	var stream bytes.Buffer
	enc := json.NewEncoder(&stream)
	for d := uint64(3); ; d-- {
		if err := enc.Encode(DrainEvent{Progress: &engine.DrainProgress{DirtyBlocks: d, InitialDirty: 3, WrittenBlocks: 3 - d}}); err != nil {
			f.Fatal(err)
		}
		if d == 0 {
			break
		}
	}
	good := bytes.Clone(stream.Bytes())
	if err := enc.Encode(DrainEvent{Done: true}); err != nil {
		f.Fatal(err)
	}
	f.Add(stream.Bytes(), uint16(0))
	f.Add(good, uint16(0))
	f.Add(append(bytes.Clone(good), mustJSON(f, DrainEvent{Error: "engine: I/O error"})...), uint16(0))
	f.Add([]byte("{\"progress\":{\"dirty_blocks\":1}}\nnot json\n{\"done\":true}\n"), uint16(0))
	f.Add(mustJSON(f, errorBody{Error: "control: busy"}), uint16(303))
	f.Add([]byte("plain text"), uint16(1))
	f.Add([]byte(strings.Repeat("x", 1<<20+1)+"\n"), uint16(0))
	f.Fuzz(func(t *testing.T, body []byte, n uint16) {
		code := replyCode(n)
		var got []engine.DrainProgress
		err := cannedClient(code, body).Drain(context.Background(), func(p engine.DrainProgress) { got = append(got, p) })
		if code != http.StatusOK {
			var re *RemoteError
			if !errors.As(err, &re) || re.Code != code || len(got) != 0 {
				t.Fatalf("status %d: error %v, progress %v", code, err, got)
			}
			return
		}
		if err == nil && !bytes.Contains(body, []byte(`"done"`)) {
			t.Fatalf("drain stream %q without done reported success", body)
		}
		// What was decoded re-encodes, the way the server writes it, to a
		// stream that decodes to the same progress and succeeds.
		var re bytes.Buffer
		enc := json.NewEncoder(&re)
		for i := range got {
			if err := enc.Encode(DrainEvent{Progress: &got[i]}); err != nil {
				t.Fatal(err)
			}
		}
		if err := enc.Encode(DrainEvent{Done: true}); err != nil {
			t.Fatal(err)
		}
		var again []engine.DrainProgress
		if err := cannedClient(http.StatusOK, re.Bytes()).Drain(context.Background(), func(p engine.DrainProgress) { again = append(again, p) }); err != nil {
			t.Fatalf("re-encoded stream %q: %v", re.Bytes(), err)
		}
		if !reflect.DeepEqual(again, got) {
			t.Fatalf("progress %v re-encoded decodes as %v", got, again)
		}
	})
}

func FuzzClientReply(f *testing.F) {
	st := newFake(5).Status()
	f.Add(mustJSON(f, st), uint16(0))
	f.Add(mustJSON(f, engine.DefaultTunables()), uint16(0))
	f.Add(mustJSON(f, errorBody{Error: `engine: unknown tunable: "colour"`}), uint16(200))
	f.Add([]byte(`{"error":""}`), uint16(2))
	f.Add([]byte("  \n"), uint16(2))
	f.Add([]byte(`{"cursor":-1}`), uint16(0))
	f.Add([]byte(`{"tunables":{"write_around_mode":2}}`), uint16(0))
	f.Fuzz(func(t *testing.T, body []byte, n uint16) {
		code := replyCode(n)
		c := cannedClient(code, body)
		ctx := context.Background()
		st, err := c.Status(ctx)
		if code != http.StatusOK {
			var re *RemoteError
			if !errors.As(err, &re) || re.Code != code {
				t.Fatalf("status %d: error %v", code, err)
			}
			var eb errorBody
			read := body[:min(len(body), 64<<10)] // the client reads at most 64 KiB of an error
			want := string(bytes.TrimSpace(read))
			if json.Unmarshal(read, &eb) == nil && eb.Error != "" {
				want = eb.Error
			}
			if re.Msg != want {
				t.Fatalf("status %d body %q: message %q, want %q", code, body, re.Msg, want)
			}
			return
		}
		if err == nil {
			var again engine.Status
			if err := json.Unmarshal(mustJSON(t, st), &again); err != nil || !reflect.DeepEqual(again, st) {
				t.Fatalf("status %+v re-encoded decodes as %+v, %v", st, again, err)
			}
		}
		if raw, err := c.StatusRaw(ctx); err == nil && !json.Valid(raw) {
			t.Fatalf("raw status %q is not JSON", raw)
		}
		if tun, err := c.Set(ctx, []Setting{{"writeback_threshold", "1"}}); err == nil {
			var again engine.Tunables
			if err := json.Unmarshal(mustJSON(t, tun), &again); err != nil || again != tun {
				t.Fatalf("tunables %+v re-encoded decode as %+v, %v", tun, again, err)
			}
		}
	})
}

func FuzzParseSettings(f *testing.F) {
	f.Add("writeback_threshold=50")
	f.Add("writeback-threshold=50\x00read_cache_threshold=0")
	f.Add("a==b\x00c=")
	f.Add("=5")
	f.Add("novalue")
	f.Add("")
	f.Fuzz(func(t *testing.T, joined string) {
		args := strings.Split(joined, "\x00")
		got, err := ParseSettings(args)
		bad := false
		for _, a := range args {
			if k, _, ok := strings.Cut(a, "="); !ok || k == "" {
				bad = true
			}
		}
		if bad != (err != nil) {
			t.Fatalf("ParseSettings(%q) = %v, %v", args, got, err)
		}
		if err != nil {
			return
		}
		if len(got) != len(args) {
			t.Fatalf("ParseSettings(%q) = %v: %d settings for %d args", args, got, len(got), len(args))
		}
		again := make([]string, len(got))
		for i, s := range got {
			if strings.Contains(s.Name, "-") {
				t.Fatalf("ParseSettings(%q): name %q keeps a dash", args, s.Name)
			}
			again[i] = s.Name + "=" + s.Value
		}
		got2, err := ParseSettings(again)
		if err != nil || !reflect.DeepEqual(got2, got) {
			t.Fatalf("settings %v re-encoded as %q parse to %v, %v", got, again, got2, err)
		}
	})
}
