package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// clientEnv makes the test binary a plain HTTP client (an unmodified Go
// program) started inside the client cgroup on the central host.
const clientEnv = "TETHER_E2E_CLIENT"

// loopStats is what the loop client reports as its last line.
type loopStats struct {
	OK               int   `json:"ok"`
	Failed           int   `json:"failed"`
	Wrong            int   `json:"wrong"`
	LongestFailureMS int64 `json:"longest_failure_ms"`
	// FailureSpanMS is from the first failure to the last: the whole
	// disturbance, failures and successes interleaved.
	FailureSpanMS int64  `json:"failure_span_ms"`
	LastError     string `json:"last_error,omitempty"`
}

// clientMain: "loop" requests every target (ip:port=expected-name, comma
// separated) round-robin for E2E_DURATION, a new connection each time, and
// reports how many failed, how many answered from the wrong host, and the
// longest stretch of time during which requests kept failing. "each"
// requests every target once.
func clientMain(mode, arg string) int {
	type target struct{ url, want string }
	var targets []target
	for _, t := range strings.Split(arg, ",") {
		addr, want, _ := strings.Cut(t, "=")
		targets = append(targets, target{"http://" + addr + "/", want})
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	ask := func(t target) (bool, error) {
		resp, err := client.Get(t.url)
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return false, err
		}
		return strings.TrimSpace(string(b)) == t.want, nil
	}
	switch mode {
	case "each":
		ok, failed := 0, 0
		for _, t := range targets {
			right, err := ask(t)
			if err != nil || !right {
				failed++
				fmt.Printf("%s: right=%v err=%v\n", t.url, right, err)
				continue
			}
			ok++
		}
		fmt.Printf("ok=%d failed=%d\n", ok, failed)
		return 0
	case "loop":
		d, err := time.ParseDuration(os.Getenv("E2E_DURATION"))
		if err != nil {
			d = 5 * time.Second
		}
		var s loopStats
		var failingSince, firstFailure time.Time
		end := time.Now().Add(d)
		for i := 0; time.Now().Before(end); i++ {
			t := targets[i%len(targets)]
			right, err := ask(t)
			now := time.Now()
			switch {
			case err != nil:
				s.Failed++
				s.LastError = err.Error()
				if firstFailure.IsZero() {
					firstFailure = now
				}
				s.FailureSpanMS = now.Sub(firstFailure).Milliseconds()
				if failingSince.IsZero() {
					failingSince = now
				}
				if w := now.Sub(failingSince).Milliseconds(); w > s.LongestFailureMS {
					s.LongestFailureMS = w
				}
				time.Sleep(20 * time.Millisecond)
			case !right:
				s.Wrong++
			default:
				s.OK++
				failingSince = time.Time{}
			}
		}
		b, _ := json.Marshal(s)
		fmt.Println(string(b))
		return 0
	}
	return 2
}
