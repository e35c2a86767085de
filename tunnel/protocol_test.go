package tunnel

import (
	"bytes"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func sampleHello() *Hello {
	return &Hello{
		AgentID: "host-11", AgentIP: netip.MustParseAddr("198.18.1.11"), Token: "s3cret", Epoch: 42,
		HeldPS:    []string{"ps-a"},
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("198.18.1.11:9100"), netip.MustParseAddrPort("[2001:db8::1]:443")},
	}
}

func TestHelloRoundTrips(t *testing.T) {
	h := sampleHello()
	b, err := EncodeHello(h)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeHello(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, h) {
		t.Fatalf("decoded %+v, want %+v", got, h)
	}
}

func TestWelcomeAndRefuseRoundTrip(t *testing.T) {
	w := &Welcome{PSID: "ps-1", PSAddr: netip.MustParseAddr("198.18.0.21"), Endpoints: []EndpointResult{
		{Port: 20001}, {Code: CodeConflict, Reason: "held by agent b"}, {Port: 20002},
	}}
	b, err := EncodeWelcome(w)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeWelcome(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, w) {
		t.Fatalf("decoded %+v, want %+v", got, w)
	}
	r := &Refuse{Code: CodeUnauthorized, Reason: "token not accepted"}
	gr, err := DecodeRefuse(EncodeRefuse(r))
	if err != nil || *gr != *r {
		t.Fatalf("refuse round trip: %+v, %v", gr, err)
	}
	if !errors.Is(gr, ErrRefused) || !strings.Contains(gr.Error(), "unauthorized") {
		t.Fatalf("a Refuse is an ErrRefused naming its code, got %q", gr.Error())
	}
}

func TestTenThousandEndpointsFitOneHello(t *testing.T) {
	h := sampleHello()
	h.Endpoints = nil
	for i := 0; i < 10000; i++ {
		h.Endpoints = append(h.Endpoints, netip.AddrPortFrom(netip.MustParseAddr("2001:db8::1"), uint16(1+i)))
	}
	b, err := EncodeHello(h)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > MaxMessageSize {
		t.Fatalf("10000 IPv6 endpoints take %d bytes, above the %d limit", len(b), MaxMessageSize)
	}
	if _, err := DecodeHello(b); err != nil {
		t.Fatal(err)
	}
}

func TestDecodeHelloRejectsBadInput(t *testing.T) {
	good, _ := EncodeHello(sampleHello())
	mutate := func(f func(h *Hello)) []byte {
		h := sampleHello()
		f(h)
		e := encoder{}
		e.str(h.AgentID)
		e.addr(h.AgentIP)
		e.str(h.Token)
		e.u64(h.Epoch)
		e.u8(byte(len(h.HeldPS)))
		for _, id := range h.HeldPS {
			e.str(id)
		}
		e.u32(uint32(len(h.Endpoints)))
		for _, ep := range h.Endpoints {
			e.addrPort(ep)
		}
		return e.b
	}
	// head is the Hello up to its endpoint count (2 endpoints: 7 + 19 bytes).
	head := func(tail ...byte) []byte {
		return append(bytes.Clone(good[:len(good)-4-26]), tail...)
	}
	cases := map[string]struct {
		in   []byte
		want string
	}{
		"empty":             {nil, "agent id length"},
		"truncated":         {bytes.Clone(good[:len(good)-3]), "need"},
		"trailing bytes":    {append(bytes.Clone(good), 0), "trailing"},
		"bad id":            {mutate(func(h *Hello) { h.AgentID = "a b" }), "not allowed"},
		"empty id":          {mutate(func(h *Hello) { h.AgentID = "" }), "agent id"},
		"port zero":         {mutate(func(h *Hello) { h.Endpoints[0] = netip.MustParseAddrPort("1.2.3.4:0") }), "usable"},
		"unspecified ip":    {mutate(func(h *Hello) { h.Endpoints[0] = netip.MustParseAddrPort("0.0.0.0:80") }), "usable"},
		"huge count":        {head(0xff, 0xff, 0xff, 0xff), "limit"},
		"missing agent ip":  {mutate(func(h *Hello) { h.AgentIP = netip.Addr{} }), "agent ip"},
		"count beyond data": {head(0, 0, 0, 200), "does not fit"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := DecodeHello(c.in)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("got %v, want an ErrMalformed", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

func TestStreamHeaderRoundTripsAndRejectsBadInput(t *testing.T) {
	for _, h := range []StreamHeader{
		{Target: netip.MustParseAddrPort("198.18.1.11:9100"), Source: netip.MustParseAddrPort("198.18.3.5:40000")},
		{Target: netip.MustParseAddrPort("[2001:db8::1]:443")},
	} {
		b, err := EncodeStreamHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ReadStreamHeader(bytes.NewReader(b))
		if err != nil || got != h {
			t.Fatalf("round trip of %+v: %+v, %v", h, got, err)
		}
	}
	if _, err := ReadStreamHeader(bytes.NewReader([]byte{9, 0})); !errors.Is(err, ErrVersion) {
		t.Fatalf("unknown stream header version: got %v, want ErrVersion", err)
	}
	if _, err := ReadStreamHeader(bytes.NewReader([]byte{StreamVersion, 200})); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized stream header: got %v, want ErrTooLarge", err)
	}
	if _, err := DecodeStreamHeader([]byte{4, 1, 2, 3, 4, 0, 0, 0, 0, 0}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("port 0 target: got %v, want ErrMalformed", err)
	}
	if _, err := DecodeStreamHeader([]byte{5, 1, 2, 3, 4, 5, 0, 80}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("address of length 5: got %v, want ErrMalformed", err)
	}
}

func TestStreamStatusRoundTrips(t *testing.T) {
	s := StreamStatus{Code: StreamDialRefused, Message: strings.Repeat("x", 400)}
	got, err := ReadStreamStatus(bytes.NewReader(EncodeStreamStatus(s)))
	if err != nil {
		t.Fatal(err)
	}
	if got.Code != s.Code || len(got.Message) != MaxStatusMessage {
		t.Fatalf("got %v with a %d-byte message, want the code and the message cut to %d", got.Code, len(got.Message), MaxStatusMessage)
	}
}

func TestReadFrameRefusesOversizeBeforeReading(t *testing.T) {
	// Only the header is there: the limit must be checked before the payload.
	_, _, err := readFrame(bytes.NewReader([]byte{msgHello, 0x10, 0, 0, 0}), MaxMessageSize)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v, want ErrTooLarge", err)
	}
}

// FuzzDecodeHello checks that no input makes the Hello decoder panic, and
// that whatever it accepts round-trips: it encodes back to the very same
// bytes (every value has exactly one encoding, SPEC.md) and those decode to
// an equal Hello. Seeds: testdata/fuzz/FuzzDecodeHello.
func FuzzDecodeHello(f *testing.F) {
	good, _ := EncodeHello(sampleHello())
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte{0, 1, 'a', 4, 1, 2, 3, 4, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeHello(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("a refused hello is not an ErrMalformed: %v", err)
			}
			return
		}
		again, err := EncodeHello(h)
		if err != nil {
			t.Fatalf("decoded hello %+v does not encode: %v", h, err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding changed the bytes:\n%x\n%x", b, again)
		}
		h2, err := DecodeHello(again)
		if err != nil || !reflect.DeepEqual(h2, h) {
			t.Fatalf("decode, encode, decode: %+v, then %+v, %v", h, h2, err)
		}
	})
}

// FuzzDecodeStreamHeader does the same for stream headers, through the
// reader the agent uses: an accepted header re-encodes to the bytes it was
// read from (what follows it on the stream is the connection's data) and
// decodes again to an equal header. Seeds:
// testdata/fuzz/FuzzDecodeStreamHeader.
func FuzzDecodeStreamHeader(f *testing.F) {
	good, _ := EncodeStreamHeader(StreamHeader{Target: netip.MustParseAddrPort("198.18.1.11:9100"), Source: netip.MustParseAddrPort("198.18.3.5:40000")})
	f.Add(good)
	f.Add([]byte{StreamVersion, 0})
	f.Add([]byte{StreamVersion, 255, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		h, err := ReadStreamHeader(r)
		if err != nil {
			return
		}
		read := b[:len(b)-r.Len()]
		again, err := EncodeStreamHeader(h)
		if err != nil {
			t.Fatalf("decoded header %+v does not encode: %v", h, err)
		}
		if !bytes.Equal(again, read) {
			t.Fatalf("re-encoding changed the bytes:\n%x\n%x", read, again)
		}
		h2, err := DecodeStreamHeader(again[2:])
		if err != nil || h2 != h {
			t.Fatalf("decode, encode, decode: %+v, then %+v, %v", h, h2, err)
		}
	})
}
