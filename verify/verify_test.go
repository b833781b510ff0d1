// Package verify keeps the Promela model and the Go code in step.
package verify

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/kvferry/kvferry/pkg/blockpool"
	"github.com/kvferry/kvferry/pkg/kvtransfer"
)

type row struct{ model, goType, value string }

func readMap(t *testing.T) []row {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var rows []row
	for _, line := range strings.Split(string(b), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) != 6 {
			continue
		}
		r := row{strings.TrimSpace(cells[1]), strings.TrimSpace(cells[2]), strings.TrimSpace(cells[3])}
		if strings.HasPrefix(r.goType, "blockpool.") || strings.HasPrefix(r.goType, "kvtransfer.") {
			rows = append(rows, r)
		}
	}
	return rows
}

// enumValues lists every named value of an enum by its String(), counting
// up from zero until the name falls back to the numeric form.
func enumValues(name func(i int) string, fallback string) []string {
	var out []string
	for i := range 256 {
		n := name(i)
		if strings.HasPrefix(n, fallback+"(") {
			break
		}
		out = append(out, n)
	}
	return out
}

func TestModelMapCoversGoEnums(t *testing.T) {
	rows := readMap(t)
	has := map[string]bool{}
	for _, r := range rows {
		has[r.goType+"/"+r.value] = true
	}
	for _, e := range []struct {
		goType string
		values []string
	}{
		{"blockpool.State", enumValues(func(i int) string { return blockpool.State(i).String() }, "state")},
		{"kvtransfer.Outcome", enumValues(func(i int) string { return kvtransfer.Outcome(i).String() }, "outcome")},
		{"kvtransfer.Disposition", enumValues(func(i int) string { return kvtransfer.Disposition(i).String() }, "disposition")},
	} {
		if len(e.values) < 4 {
			t.Fatalf("%s: only %v found", e.goType, e.values)
		}
		for _, v := range e.values {
			if !has[e.goType+"/"+v] {
				t.Errorf("%s value %q has no row in verify/README.md: add it to the model and the map", e.goType, v)
			}
		}
	}
}

func TestMapNamesModelValues(t *testing.T) {
	b, err := os.ReadFile("transfer.pml")
	if err != nil {
		t.Fatal(err)
	}
	declared := map[string]bool{}
	for _, m := range regexp.MustCompile(`mtype\s*=\s*\{([^}]*)\}`).FindAllStringSubmatch(string(b), -1) {
		for _, name := range strings.Split(m[1], ",") {
			declared[strings.TrimSpace(name)] = true
		}
	}
	for _, r := range readMap(t) {
		if !declared[r.model] {
			t.Errorf("verify/README.md maps %s, which transfer.pml does not declare", r.model)
		}
	}
}
