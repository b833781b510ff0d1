package loglock

import (
	"slices"
	"testing"
)

// Work queued under the lock runs after the unlock, in order, with the
// lock free (it can take the lock itself), and once.
func TestLaterRunsAfterUnlock(t *testing.T) {
	var m Mutex
	var got []string
	m.Lock()
	m.Later(func() {
		m.Lock() // would deadlock if run under the lock
		got = append(got, "first")
		m.Unlock()
	})
	m.Later(func() { got = append(got, "second") })
	if len(got) != 0 {
		t.Fatal("queued work ran under the lock")
	}
	m.Unlock()
	if want := []string{"first", "second"}; !slices.Equal(got, want) {
		t.Fatalf("ran %v, want %v", got, want)
	}
	m.Lock()
	m.Unlock()
	if len(got) != 2 {
		t.Fatalf("work ran twice: %v", got)
	}
}
