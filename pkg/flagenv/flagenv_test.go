package flagenv

import (
	"flag"
	"testing"
	"time"
)

func TestApply(t *testing.T) {
	env := map[string]string{
		"KVFERRY_LISTEN_ADDR":      "from-env",
		"KVFERRY_TRANSFER_TIMEOUT": "3s",
		"KVFERRY_BLOCKS":           "not-a-number-but-flag-wins",
	}
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	addr := fs.String("listen-addr", "default", "")
	d := fs.Duration("transfer-timeout", time.Second, "")
	n := fs.Int("blocks", 1, "")
	if err := fs.Parse([]string{"--blocks=7"}); err != nil {
		t.Fatal(err)
	}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	if err := Apply(fs, lookup); err != nil {
		t.Fatal(err)
	}
	if *addr != "from-env" || *d != 3*time.Second || *n != 7 {
		t.Fatalf("got %q %v %d", *addr, *d, *n)
	}
	// Unparsed flag set with a bad env value for an int.
	fs3 := flag.NewFlagSet("z", flag.ContinueOnError)
	fs3.Int("blocks", 1, "")
	if err := Apply(fs3, lookup); err == nil {
		t.Fatal("bad int from env: want error")
	}
}

func TestEnvName(t *testing.T) {
	if got := EnvName("transfer-progress-timeout"); got != "KVFERRY_TRANSFER_PROGRESS_TIMEOUT" {
		t.Fatal(got)
	}
}
