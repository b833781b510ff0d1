package router

import "testing"

func TestKeys(t *testing.T) {
	var none *Keys
	if !none.CheckBearer("") || none.Enabled() {
		t.Fatal("no keys must accept everything")
	}
	k := NewKeys([]string{"alpha", "beta"})
	for header, want := range map[string]bool{
		"Bearer alpha": true, "Bearer beta": true, "Bearer  beta ": true,
		"Bearer gamma": false, "alpha": false, "": false, "Bearer ": false, "Basic alpha": false,
	} {
		if got := k.CheckBearer(header); got != want {
			t.Errorf("CheckBearer(%q) = %v, want %v", header, got, want)
		}
	}
	k.Set([]string{"gamma"})
	if k.Check("alpha") || !k.Check("gamma") {
		t.Fatal("Set did not replace the keys")
	}
	if _, err := parseKeys([]byte("# only a comment\n\n")); err == nil {
		t.Fatal("a file without keys parsed")
	}
}
