// Package deps enforces the dependency direction of DESIGN §2: blockpool
// imports nothing of ours; kvtransfer and executor may import blockpool
// (and the wire contract) but not each other or anything above; nothing in
// pkg/ imports cmd/ or test/.
package deps

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/kvferry/kvferry/"

// allowed lists, per package, the only kvferry packages it may import.
// A package not listed here may import any pkg/ package but never cmd/ or
// test/.
var allowed = map[string][]string{
	"pkg/blockpool":  {},
	"pkg/executor":   {"pkg/ticket", "proto/kvferry/v1"},
	"pkg/kvtransfer": {"pkg/blockpool", "proto/kvferry/v1"},
	"pkg/ticket":     {"proto/kvferry/v1"},
	"pkg/buildinfo":  {},
	"pkg/flagenv":    {},
	"pkg/identity":   {},
}

func TestDependencyDirection(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, "github.com/kvferry/kvferry/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	seen := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(fields[0], module)
		if !strings.HasPrefix(pkg, "pkg/") {
			continue
		}
		seen++
		allow, restricted := allowed[pkg]
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, module) {
				continue
			}
			dep := strings.TrimPrefix(imp, module)
			if strings.HasPrefix(dep, "cmd/") || strings.HasPrefix(dep, "test/") {
				t.Errorf("%s imports %s: pkg/ never imports cmd/ or test/", pkg, dep)
			}
			if restricted && !contains(allow, dep) {
				t.Errorf("%s imports %s; it may import only %v", pkg, dep, allow)
			}
		}
	}
	if seen < len(allowed) {
		t.Fatalf("saw %d pkg/ packages, fewer than the %d with rules: go list output changed?", seen, len(allowed))
	}
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// notLinked lists, per command, kvferry packages its binary must not link
// (directly or not): the router never touches KV memory, so it links no
// transport, no server skeleton and no NVML.
var notLinked = map[string][]string{
	"cmd/router": {"pkg/kvtransfer", "pkg/blockpool", "pkg/health/gpu", "cmd/internal/servercmd", "pkg/ctxserver", "pkg/genserver", "pkg/loadgen"},
	"cmd/kvload": {"pkg/kvtransfer", "pkg/blockpool", "pkg/router", "cmd/internal/servercmd"},
}

func TestCommandsLinkOnlyWhatTheyRun(t *testing.T) {
	for cmd, forbidden := range notLinked {
		out, err := exec.Command("go", "list", "-deps", module+cmd).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", cmd, err)
		}
		deps := strings.Fields(string(out))
		if !contains(deps, module+cmd) {
			t.Fatalf("go list -deps %s did not list the command itself: output changed?", cmd)
		}
		for _, f := range forbidden {
			if contains(deps, module+f) {
				t.Errorf("%s links %s", cmd, f)
			}
		}
	}
}
