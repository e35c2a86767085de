package tunnel

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestControlMessagesRoundTrip(t *testing.T) {
	for _, m := range []ControlMsg{
		&LostTunnel{ID: 7, PSID: "ps-b", Routes: []LostRoute{
			{Target: netip.MustParseAddrPort("127.77.0.1:9100"), Port: 20001},
			{Target: netip.MustParseAddrPort("[2001:db8::1]:443"), Port: 65535},
		}},
		&LostTunnel{ID: 1, PSID: "p", Routes: []LostRoute{}},
		&Withdraw{ID: 42},
		&Ack{ID: 7, Code: CodeOK, Count: 2},
		&Ack{ID: 8, Code: CodeStaleEpoch, Reason: "superseded"},
		&Bye{Reason: "tunnel closed by the ps"},
		&PoolJoin{ID: 9},
		&PoolGrant{ID: 9, Key: PoolKey{1, 2, 3, 31: 0xff}, Addr: netip.MustParseAddrPort("127.0.0.1:7001"), Size: 8},
		&PoolGrant{ID: 10, Key: PoolKey{0xaa}, Addr: netip.MustParseAddrPort("[2001:db8::7]:7001"), Size: 65535},
	} {
		frame, err := EncodeControl(m)
		if err != nil {
			t.Fatalf("encode %T: %v", m, err)
		}
		got, err := readControl(bytes.NewReader(frame))
		if err != nil {
			t.Fatalf("decode %T: %v", m, err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Errorf("round trip: got %+v, want %+v", got, m)
		}
	}
}

func TestControlDecodingIsStrict(t *testing.T) {
	lost, _ := EncodeControl(&LostTunnel{ID: 1, PSID: "ps-b", Routes: []LostRoute{{Target: netip.MustParseAddrPort("127.77.0.1:9100"), Port: 20001}}})
	payload := lost[frameHeaderSize:]
	for name, tc := range map[string]struct {
		typ byte
		b   []byte
	}{
		"trailing byte":     {ctlLostTunnel, append(append([]byte{}, payload...), 0)},
		"truncated":         {ctlLostTunnel, payload[:len(payload)-1]},
		"port zero":         {ctlLostTunnel, append(append([]byte{}, payload[:len(payload)-2]...), 0, 0)},
		"ps id with colon":  {ctlLostTunnel, []byte{0, 0, 0, 1, 0, 3, 'a', ':', 'b', 0, 0, 0, 0}},
		"count beyond data": {ctlLostTunnel, []byte{0, 0, 0, 1, 0, 1, 'a', 0, 0, 1, 0}},
		"withdraw too long": {ctlWithdraw, []byte{0, 0, 0, 1, 9}},
		"ack short":         {ctlAck, []byte{0, 0, 0, 1, 0}},
		"join too long":     {ctlPoolJoin, []byte{0, 0, 0, 1, 0}},
		"join short":        {ctlPoolJoin, []byte{0, 0, 1}},
		"grant short key":   {ctlPoolGrant, append([]byte{0, 0, 0, 1}, make([]byte, 31)...)},
		"grant no address":  {ctlPoolGrant, grantPayload(t, 0, 4)[:4+PoolKeySize]},
		"grant size 0":      {ctlPoolGrant, grantPayload(t, 0, 0)},
		"grant trailing":    {ctlPoolGrant, append(grantPayload(t, 0, 4), 0)},
		"grant port 0":      {ctlPoolGrant, grantPayload(t, 1, 4)},
		"grant unspecified": {ctlPoolGrant, grantPayload(t, 2, 4)},
		"grant mapped v6":   {ctlPoolGrant, grantPayload(t, 3, 4)},
		"grant bad addrlen": {ctlPoolGrant, grantPayload(t, 4, 4)},
	} {
		if _, err := DecodeControl(tc.typ, tc.b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %v, want ErrMalformed", name, err)
		}
	}
	// A request of a type this version does not know decodes to its id.
	m, err := DecodeControl(99, []byte{0, 0, 0, 5, 1, 2, 3})
	if u, ok := m.(*UnknownControl); err != nil || !ok || u.ID != 5 || u.Type != 99 {
		t.Errorf("unknown type: got %+v, %v", m, err)
	}
	// The size limit is checked before the payload is read.
	big := []byte{ctlLostTunnel, 0xff, 0xff, 0xff, 0xff}
	if _, err := readControl(bytes.NewReader(big)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized frame: got %v, want ErrTooLarge", err)
	}
	// The largest report fits.
	routes := make([]LostRoute, MaxEndpoints)
	for i := range routes {
		routes[i] = LostRoute{Target: netip.AddrPortFrom(netip.MustParseAddr("2001:db8::1"), uint16(i+1)), Port: uint16(i + 1)}
	}
	if _, err := EncodeControl(&LostTunnel{ID: 1, PSID: "ps", Routes: routes}); err != nil {
		t.Errorf("a report of %d IPv6 routes: %v", MaxEndpoints, err)
	}
}

// grantPayload returns a PoolGrant payload of size size whose dial address
// is: 0 a good IPv4 one, 1 port 0, 2 unspecified, 3 IPv4-mapped IPv6,
// 4 an address length of 5. Only 0 can be encoded by EncodeControl.
func grantPayload(t *testing.T, addr int, size uint16) []byte {
	t.Helper()
	e := encoder{}
	e.u32(1)
	e.b = append(e.b, make([]byte, PoolKeySize)...)
	switch addr {
	case 0:
		e.addrPort(netip.MustParseAddrPort("127.0.0.1:7001"))
	case 1:
		e.addrPort(netip.MustParseAddrPort("127.0.0.1:0"))
	case 2:
		e.addrPort(netip.MustParseAddrPort("0.0.0.0:7001"))
	case 3:
		e.u8(16)
		e.b = append(e.b, netip.MustParseAddr("::ffff:127.0.0.1").AsSlice()...)
		e.u16(7001)
	case 4:
		e.u8(5)
		e.b = append(e.b, 1, 2, 3, 4, 5)
		e.u16(7001)
	}
	e.u16(size)
	return e.b
}

func TestPoolGrantEncodingRefusesWhatCannotBeDecoded(t *testing.T) {
	for name, g := range map[string]*PoolGrant{
		"no address":  {ID: 1, Size: 1},
		"port 0":      {ID: 1, Addr: netip.MustParseAddrPort("127.0.0.1:0"), Size: 1},
		"unspecified": {ID: 1, Addr: netip.MustParseAddrPort("[::]:7001"), Size: 1},
		"size 0":      {ID: 1, Addr: netip.MustParseAddrPort("127.0.0.1:7001")},
	} {
		if _, err := EncodeControl(g); err == nil {
			t.Errorf("%s: a grant that no agent would decode was encoded", name)
		}
	}
}

func FuzzDecodeControl(f *testing.F) {
	for _, m := range []ControlMsg{
		&LostTunnel{ID: 7, PSID: "ps-b", Routes: []LostRoute{{Target: netip.MustParseAddrPort("127.77.0.1:9100"), Port: 20001}}},
		&Withdraw{ID: 1}, &Ack{ID: 1, Code: CodeOK, Count: 3, Reason: "x"}, &Bye{Reason: "bye"},
		&PoolJoin{ID: 2}, &PoolGrant{ID: 2, Key: PoolKey{7}, Addr: netip.MustParseAddrPort("[2001:db8::1]:7001"), Size: 8},
	} {
		frame, _ := EncodeControl(m)
		f.Add(frame[0], frame[frameHeaderSize:])
	}
	f.Fuzz(func(t *testing.T, typ byte, b []byte) {
		m, err := DecodeControl(typ, b)
		if err != nil {
			return
		}
		if _, ok := m.(*UnknownControl); ok {
			return
		}
		// Whatever decodes has exactly one encoding: re-encoding gives
		// the same bytes.
		frame, err := EncodeControl(m)
		if err != nil {
			t.Fatalf("decoded %+v does not encode: %v", m, err)
		}
		if !bytes.Equal(frame[frameHeaderSize:], b) || frame[0] != typ {
			t.Fatalf("re-encoding %+v: got %x, want %x", m, frame[frameHeaderSize:], b)
		}
	})
}

// handler records requests and answers them.
type recHandler struct {
	lost     atomic.Pointer[LostTunnel]
	withdraw atomic.Int32
	grant    *PoolGrant // nil: JoinPool refuses as a --data-path mux PS
}

func (h *recHandler) JoinPool(context.Context) (*PoolGrant, Ack) {
	if h.grant == nil {
		return nil, Ack{Code: CodeUnavailable, Reason: "data path is mux"}
	}
	g := *h.grant
	return &g, Ack{}
}

func (h *recHandler) LostTunnel(_ context.Context, m *LostTunnel) Ack {
	h.lost.Store(m)
	return Ack{Code: CodeOK, Count: uint32(len(m.Routes))}
}

func (h *recHandler) Withdraw(context.Context) Ack {
	h.withdraw.Add(1)
	return Ack{Code: CodeOK, Count: 2}
}

// TestControlChannel runs the control channel on every transport: the PS
// opens it, the agent's ReadHeader hands it to the session (it is not a
// client stream), requests get their acks, client streams still work, and
// the PS's Close tells the agent the tunnel ends on purpose.
func TestControlChannel(t *testing.T) {
	for _, tr := range transports(t) {
		t.Run(tr.name, func(t *testing.T) {
			ac, pc, cliTLS := tr.pair(t)
			psSess, psErr := welcomeAsPS(pc)
			as, err := Handshake(context.Background(), ac, testHello(), ClientConfig{TLS: cliTLS, Timeout: 5 * time.Second})
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			defer as.Close()
			if err := <-psErr; err != nil {
				t.Fatal(err)
			}
			ps := <-psSess
			var clientStreams atomic.Int32
			go func() {
				for {
					in, err := as.Accept(context.Background())
					if err != nil {
						return
					}
					go func() {
						if _, err := in.ReadHeader(time.Second); errors.Is(err, ErrControlStream) {
							return
						}
						clientStreams.Add(1)
						_ = in.Reject(StreamNotExposed, "test")
					}()
				}
			}()
			ctl, err := ps.OpenControl(2 * time.Second)
			if err != nil {
				t.Fatalf("open control: %v", err)
			}
			h := &recHandler{}
			go func() { _ = ctl.Serve(context.Background(), h) }()
			c := as.Control()
			if c == nil {
				t.Fatal("the agent session has no control channel after the PS opened it")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			routes := []LostRoute{{Target: netip.MustParseAddrPort("127.77.0.1:9100"), Port: 20001}}
			ack, err := c.ReportLost(ctx, "ps-b", routes)
			if err != nil || ack.Code != CodeOK || ack.Count != 1 {
				t.Fatalf("report: ack %+v, err %v", ack, err)
			}
			if got := h.lost.Load(); got == nil || got.PSID != "ps-b" || !reflect.DeepEqual(got.Routes, routes) {
				t.Errorf("ps got report %+v", got)
			}
			if ack, err := c.Withdraw(ctx); err != nil || ack.Count != 2 || h.withdraw.Load() != 1 {
				t.Errorf("withdraw: ack %+v, err %v", ack, err)
			}
			if clientStreams.Load() != 0 {
				t.Errorf("the control stream was served as a client stream")
			}
			if _, ok := as.ClosedByPS(0); ok {
				t.Error("a live tunnel says it was closed")
			}
			_ = ps.Close()
			<-as.Done()
			if why, ok := as.ClosedByPS(time.Second); !ok || !strings.Contains(why, "closed by the ps") {
				t.Errorf("after the PS closed the tunnel: ClosedByPS = %q, %v", why, ok)
			}
		})
	}
}

// An agent that predates the control channel answers its header with
// unsupported_version: the PS learns it has no channel, streams still work.
func TestControlChannelRefusedByAnOlderAgent(t *testing.T) {
	tr := transports(t)[1]
	ac, pc, _ := tr.pair(t)
	psSess, psErr := welcomeAsPS(pc)
	as, err := Handshake(context.Background(), ac, testHello(), ClientConfig{Timeout: 5 * time.Second, DisableControl: true})
	if err != nil {
		t.Fatal(err)
	}
	defer as.Close()
	if err := <-psErr; err != nil {
		t.Fatal(err)
	}
	ps := <-psSess
	defer ps.Close()
	go echoUpperAsAgent(as)
	if _, err := ps.OpenControl(2 * time.Second); !errors.Is(err, ErrNoControl) {
		t.Fatalf("open control on an older agent: got %v, want ErrNoControl", err)
	}
	if as.Control() != nil {
		t.Error("an agent with the channel disabled took it")
	}
	st, err := ps.Open(StreamHeader{Target: netip.MustParseAddrPort("127.77.0.1:9100")}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = st.Write([]byte("still works"))
	_ = st.CloseWrite()
	buf := make([]byte, 64)
	n, _ := st.Read(buf)
	if string(buf[:n]) != "STILL WORKS" {
		t.Fatalf("stream after a refused control channel: got %q", buf[:n])
	}
}
