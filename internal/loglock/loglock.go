// Package loglock is a mutex that keeps I/O out of its critical sections:
// what its holder wants written (a log line) is queued and run by Unlock
// once the lock is released.
package loglock

import "sync"

// Mutex is a sync.Mutex with a queue of work for after the unlock. The
// zero value is an unlocked mutex.
type Mutex struct {
	mu    sync.Mutex
	later []func()
}

// Lock locks m.
func (m *Mutex) Lock() { m.mu.Lock() }

// Unlock unlocks m, then runs, in order, what Later queued while it was
// held.
func (m *Mutex) Unlock() {
	later := m.later
	m.later = nil
	m.mu.Unlock()
	for _, f := range later {
		f()
	}
}

// Later queues f to run once m is unlocked. Call it only while holding m.
func (m *Mutex) Later(f func()) { m.later = append(m.later, f) }
