package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// clientEnv makes the test binary a plain HTTP client (an unmodified Go
// program) started inside the client cgroup on the central host.
const clientEnv = "TETHER_E2E_CLIENT"

// clientMaxEnv bounds how long a loop client runs if nobody stops it.
const clientMaxEnv = "E2E_MAX_DURATION"

// requestTimeout bounds every request of the client, connect included:
// a regression shows up as a failed request, never as a hang.
const requestTimeout = 2 * time.Second

// sample is one request of the loop client, printed as one JSON line.
type sample struct {
	Start  int64  `json:"start"` // unix ns, when the request began
	End    int64  `json:"end"`   // unix ns, when its outcome was known
	Target string `json:"target"`
	Result string `json:"result"`           // resultOK, resultFailed or resultWrong
	Detail string `json:"detail,omitempty"` // the error, or the wrong answer
}

const (
	resultOK     = "ok"
	resultFailed = "failed"
	resultWrong  = "wrong"
	// loopDone is the loop client's last line: every sample was printed.
	loopDone = "loop done"
)

func (s sample) start() time.Time { return time.Unix(0, s.Start) }
func (s sample) end() time.Time   { return time.Unix(0, s.End) }

// clientMain: "loop" requests every target (ip:port=expected-name, comma
// separated) round-robin, a new connection each time, until SIGTERM (or
// E2E_MAX_DURATION), printing one sample per request; "each" requests every
// target once and prints ok=N failed=M.
func clientMain(mode, arg string) int {
	type target struct{ addr, want string }
	var targets []target
	for _, t := range strings.Split(arg, ",") {
		addr, want, _ := strings.Cut(t, "=")
		targets = append(targets, target{addr, want})
	}
	switch mode {
	case "each":
		ok, failed := 0, 0
		for _, t := range targets {
			got, err := ask(t.addr)
			if err != nil || got != t.want {
				failed++
				fmt.Printf("%s: got %q err=%v\n", t.addr, got, err)
				continue
			}
			ok++
		}
		fmt.Printf("ok=%d failed=%d\n", ok, failed)
		return 0
	case "loop":
		max, err := time.ParseDuration(os.Getenv(clientMaxEnv))
		if err != nil {
			max = 2 * time.Minute
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
		defer stop()
		ctx, cancel := context.WithTimeout(ctx, max)
		defer cancel()
		n := 0
		for i := 0; ctx.Err() == nil; i++ {
			t := targets[i%len(targets)]
			s := sample{Start: time.Now().UnixNano(), Target: t.addr}
			got, err := ask(t.addr)
			s.End = time.Now().UnixNano()
			switch {
			case err != nil:
				s.Result, s.Detail = resultFailed, err.Error()
			case got != t.want:
				s.Result, s.Detail = resultWrong, got
			default:
				s.Result = resultOK
			}
			b, _ := json.Marshal(s)
			fmt.Println(string(b))
			n++
			if err != nil {
				time.Sleep(20 * time.Millisecond)
			}
		}
		fmt.Printf("%s: %d requests\n", loopDone, n)
		return 0
	}
	return 2
}

// ask makes one HTTP request to addr on a new connection, with a deadline
// on the connect and on every read and write, and returns the trimmed body.
func ask(addr string) (string, error) {
	deadline := time.Now().Add(requestTimeout)
	c, err := (&net.Dialer{Deadline: deadline}).Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return "", err
	}
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", addr, resp.Status)
	}
	return strings.TrimSpace(string(b)), nil
}
