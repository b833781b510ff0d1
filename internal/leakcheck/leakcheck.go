// Package leakcheck is the TestMain of every package that starts
// goroutines: after the tests, none of them may still run (goleak).
package leakcheck

import (
	"flag"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// VerifyTestMain runs the tests and fails if goroutines outlive them. A
// fuzzing run (-test.fuzz) is not checked: the fuzzing engine's own
// goroutines may still be winding down when m.Run returns, which made
// goleak fail a fuzz run that found nothing.
func VerifyTestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.fuzz"); f != nil && f.Value.String() != "" {
		os.Exit(m.Run())
	}
	goleak.VerifyTestMain(m)
}
