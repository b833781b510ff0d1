//go:build race

package kvtransfer

// raceEnabled: the race detector slows the single-goroutine simulation
// twentyfold without finding anything in it; make test runs the full seed
// count without -race in a step of its own.
const raceEnabled = true
