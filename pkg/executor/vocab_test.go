package executor

import "testing"

// The router's vocabulary-only load knows the same context, vocabulary and
// tokens as the engine the servers run.
func TestLlamaVocabOnlyAgreesWithEngine(t *testing.T) {
	e, _ := testEngines(t)
	v, spec, err := OpenLlamaVocab(testLlamaConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	if spec.MaxContextTokens != e.Model().MaxContextTokens || spec.Vocab != e.Model().Vocab || spec.Name != e.Model().Name {
		t.Fatalf("vocab-only spec %+v, engine %+v", spec, e.Model())
	}
	a, b := v.Encode(knownPrompt), e.Vocabulary().Encode(knownPrompt)
	if len(a) == 0 || len(a) != len(b) {
		t.Fatalf("tokens %v and %v", a, b)
	}
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("tokens %v and %v", a, b)
		}
	}
	if got := v.Chat([]ChatMessage{{Role: "user", Content: "hi"}}); got != RenderChat([]ChatMessage{{Role: "user", Content: "hi"}}) {
		t.Fatalf("stories260K has no chat template, got %q", got)
	}
}
