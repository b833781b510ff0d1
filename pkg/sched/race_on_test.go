//go:build race

package sched

// raceEnabled: the race detector slows the single-goroutine scheduler
// simulation tenfold without finding anything in it; make test runs the
// full seed count without -race in a step of its own.
const raceEnabled = true
