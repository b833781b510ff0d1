// Package poll is the one way kvferry's tests wait for something that
// must happen: poll a condition on a ticker until it holds or a deadline
// passes (never a sleep).
package poll

import (
	"testing"
	"time"
)

// Until polls cond every interval until it holds, failing t with what
// once within has passed.
func Until(t testing.TB, within, interval time.Duration, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	deadline := time.After(within)
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out after %s waiting for: %s", within, what)
		}
	}
}
