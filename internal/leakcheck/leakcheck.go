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
// fuzzing run (-test.fuzz) is not checked: it searches inputs, its
// workers are the fuzzing engine's, and the tests' own leaks are caught
// by the plain run of the same package.
func VerifyTestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("test.fuzz"); f != nil && f.Value.String() != "" {
		os.Exit(m.Run())
	}
	goleak.VerifyTestMain(m)
}
