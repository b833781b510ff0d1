// Package deps enforces the layer map of docs/architecture.md, Layers: every package of
// pkg/ and internal/ is listed with the only kvferry packages it may
// import, so a new arrow upward — or a new package nobody placed — fails
// here. Below everything: blockpool, the wire contract (proto), leaf
// helpers. Then the engines (executor) and the transfer lifecycle
// (kvtransfer), which never import each other; then the plumbing (serving,
// connpool, routine, metrics, health); then the servers and the router.
// Nothing in pkg/ imports cmd/ or test/.
package deps

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/kvferry/kvferry/"

// allowed lists, per package, the only kvferry packages it may import.
var allowed = map[string][]string{
	// Leaves.
	"pkg/blockpool":                      {},
	"pkg/buildinfo":                      {},
	"pkg/flagenv":                        {},
	"pkg/identity":                       {},
	"pkg/loadgen":                        {},
	"pkg/routine":                        {},
	"pkg/router/discovery":               {},
	"pkg/router/discovery/discoverytest": {},
	"internal/leakcheck":                 {},
	"internal/loglock":                   {},
	"internal/poll":                      {},
	"pkg/ticket":                         {"proto/kvferry/v1"},
	"pkg/tracing":                        {},
	"pkg/gguf":                           {},
	"pkg/grammar":                        {},
	// The engines and the transfer lifecycle: never each other.
	"pkg/executor":   {"pkg/grammar", "pkg/ticket", "proto/kvferry/v1"},
	"pkg/kvtransfer": {"pkg/blockpool", "proto/kvferry/v1"},
	// The scheduling loops, admission and the request table drive an engine
	// through the seam.
	"pkg/sched": {"pkg/executor", "pkg/ticket", "proto/kvferry/v1"},
	// The transports sit on the lifecycle and the seam; each its own
	// package, none importing another (transports picks one by name; the
	// conformance kit drives any).
	"pkg/kvtransfer/internal/dialgroup": {},
	"pkg/kvtransfer/internal/netloop":   {},
	"pkg/kvtransfer/tcp":                {"pkg/kvtransfer", "pkg/kvtransfer/internal/netloop"},
	"pkg/kvtransfer/shm":                {"pkg/kvtransfer", "pkg/kvtransfer/internal/dialgroup", "pkg/kvtransfer/internal/netloop"},
	"pkg/kvtransfer/ucx":                {"pkg/kvtransfer"},
	"pkg/kvtransfer/transports":         {"pkg/kvtransfer", "pkg/kvtransfer/shm", "pkg/kvtransfer/tcp", "pkg/kvtransfer/ucx"},
	"pkg/kvtransfer/transfertest":       {"internal/leakcheck", "internal/poll", "pkg/kvtransfer", "pkg/kvtransfer/fault"},
	// Fault injection is a kvtransfer.Injector, imported by nothing below
	// the context server that drills it.
	"pkg/kvtransfer/fault": {},
	// Plumbing.
	"pkg/serving":    {"pkg/identity"},
	"pkg/connpool":   {"pkg/serving"},
	"pkg/metrics":    {"pkg/buildinfo", "proto/kvferry/v1"},
	"pkg/health":     {"pkg/metrics", "pkg/routine", "proto/kvferry/v1"},
	"pkg/health/gpu": {"pkg/metrics", "pkg/routine", "proto/kvferry/v1"},
	// The servers and the router. The router never touches KV memory: no
	// block pool, no transfer package.
	"pkg/ctxserver": {"internal/loglock", "pkg/blockpool", "pkg/executor", "pkg/sched", "pkg/health", "pkg/kvtransfer", "pkg/kvtransfer/fault", "pkg/metrics", "pkg/routine", "pkg/ticket", "pkg/tracing", "proto/kvferry/v1"},
	"pkg/genserver": {"internal/loglock", "pkg/blockpool", "pkg/connpool", "pkg/executor", "pkg/sched", "pkg/health", "pkg/kvtransfer", "pkg/metrics", "pkg/routine", "pkg/serving", "pkg/ticket", "proto/kvferry/v1"},
	"pkg/router":    {"pkg/connpool", "pkg/executor", "pkg/grammar", "pkg/health", "pkg/identity", "pkg/metrics", "pkg/router/discovery", "pkg/routine", "pkg/serving", "pkg/ticket", "proto/kvferry/v1"},
}

func TestDependencyDirection(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, "github.com/kvferry/kvferry/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(fields[0], module)
		if !strings.HasPrefix(pkg, "pkg/") && !strings.HasPrefix(pkg, "internal/") {
			continue
		}
		seen[pkg] = true
		allow, placed := allowed[pkg]
		if !placed {
			t.Errorf("%s is not in the layer map: add it to allowed with what it may import", pkg)
			continue
		}
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, module) {
				continue
			}
			dep := strings.TrimPrefix(imp, module)
			if strings.HasPrefix(dep, "cmd/") || strings.HasPrefix(dep, "test/") {
				t.Errorf("%s imports %s: pkg/ never imports cmd/ or test/", pkg, dep)
			}
			if !contains(allow, dep) {
				t.Errorf("%s imports %s; it may import only %v", pkg, dep, allow)
			}
		}
	}
	for pkg := range allowed {
		if !seen[pkg] {
			t.Errorf("the layer map names %s, which go list does not show: remove it", pkg)
		}
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
	"cmd/router": {"pkg/kvtransfer", "pkg/kvtransfer/tcp", "pkg/kvtransfer/shm", "pkg/kvtransfer/ucx", "pkg/blockpool", "pkg/health/gpu", "cmd/internal/servercmd", "pkg/ctxserver", "pkg/genserver", "pkg/loadgen"},
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
