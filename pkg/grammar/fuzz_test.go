package grammar

import "testing"

// FuzzSchema: any schema text compiles or is refused with an error, and a
// compiled grammar follows any text without panicking or looping.
func FuzzSchema(f *testing.F) {
	for _, tc := range schemaCases {
		f.Add([]byte(tc.schema), []byte(tc.ok[0]))
	}
	f.Add([]byte(`{"$ref":"#"}`), []byte(`{}`))
	f.Fuzz(func(t *testing.T, schema, text []byte) {
		g, err := Schema(schema)
		if err != nil {
			return
		}
		m := NewMatcher(g)
		for i := range text {
			if m.MustEnd() {
				break
			}
			m.Accept(string(text[i : i+1]))
		}
		_ = m.CanEnd()
	})
}
