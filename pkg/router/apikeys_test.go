package router

import (
	"strings"
	"testing"
)

func TestKeys(t *testing.T) {
	var none *Keys
	if !none.CheckBearer("") || none.Enabled() {
		t.Fatal("no keys must accept everything")
	}
	k := NewKeys([]Key{{Secret: "alpha"}, {Secret: "beta"}})
	for header, want := range map[string]bool{
		"Bearer alpha": true, "Bearer beta": true, "Bearer  beta ": true,
		"Bearer gamma": false, "alpha": false, "": false, "Bearer ": false, "Basic alpha": false,
	} {
		if got := k.CheckBearer(header); got != want {
			t.Errorf("CheckBearer(%q) = %v, want %v", header, got, want)
		}
	}
	k.Set([]Key{{Secret: "gamma"}})
	if k.Check("alpha") || !k.Check("gamma") {
		t.Fatal("Set did not replace the keys")
	}
	if _, err := parseKeys([]byte("# only a comment\n\n")); err == nil {
		t.Fatal("a file without keys parsed")
	}
}

// TestTenants: a key's tenant is its label, or its own (a digest prefix,
// never the key); two unlabelled keys are two tenants, two keys with one
// label one tenant; a refused key has none.
func TestTenants(t *testing.T) {
	keys, err := parseKeys([]byte("alpha acme\nbeta acme\ngamma\ndelta\n# c\n"))
	if err != nil {
		t.Fatal(err)
	}
	k := NewKeys(keys)
	tenant := func(key string) string {
		got, ok := k.Tenant(key)
		if !ok {
			t.Fatalf("key %q refused", key)
		}
		if strings.Contains(got, key) {
			t.Fatalf("tenant %q carries the key %q", got, key)
		}
		return got
	}
	if a, b := tenant("alpha"), tenant("beta"); a != b || a != "tenant:acme" {
		t.Errorf("one label, tenants %q and %q", a, b)
	}
	if g, d := tenant("gamma"), tenant("delta"); g == d || g == tenant("alpha") {
		t.Errorf("unlabelled keys share a tenant: %q %q", g, d)
	}
	if got, ok := k.Tenant("acme"); ok || got != "" {
		t.Errorf("a tenant label is not a key: %q %v", got, ok)
	}
	if _, err := parseKeys([]byte("a b c\n")); err == nil {
		t.Error("a line of three fields parsed")
	}
}
