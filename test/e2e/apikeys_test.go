package e2e

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
	"github.com/kvferry/kvferry/test/stack"
)

// TestAPIKeysOnEveryPublicSurface: the gRPC RouterService takes the same
// keys as HTTP (UNAUTHENTICATED without one), health stays open, and a
// changed key file is in force without a restart.
func TestAPIKeysOnEveryPublicSurface(t *testing.T) {
	keys := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(keys, []byte("old-key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := stack.Up(t, binDir, stack.Options{ExtraRouterArgs: []string{"--api-keys-file=" + keys}})
	rc := kvferryv1.NewRouterServiceClient(grpcConn(t, s.RouterGRPC))
	generate := func(key string) error {
		ctx := testCtx(t)
		if key != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
		}
		st, err := rc.Generate(ctx, &kvferryv1.RouterServiceGenerateRequest{Model: "tiny", Prompt: "the river", Sampling: &kvferryv1.SamplingParams{MaxTokens: 2}})
		if err != nil {
			return err
		}
		for {
			if _, err := st.Recv(); err != nil {
				if strings.Contains(err.Error(), "EOF") {
					return nil
				}
				return err
			}
		}
	}
	for _, key := range []string{"", "wrong"} {
		if err := generate(key); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("gRPC Generate with key %q: %v, want Unauthenticated", key, err)
		}
	}
	if _, err := rc.Cancel(testCtx(t), &kvferryv1.RouterServiceCancelRequest{RequestId: "x"}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("gRPC Cancel without a key: %v, want Unauthenticated", err)
	}
	if err := generate("old-key"); err != nil {
		t.Fatalf("gRPC Generate with the key: %v", err)
	}
	httpCode := func(key string) int {
		req, _ := http.NewRequestWithContext(testCtx(t), "POST", s.OpenAIURL+"/completions", strings.NewReader(`{"model":"tiny","prompt":"the","max_tokens":1}`))
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// Rotate: the new key works and the old one stops, without a restart.
	if err := os.WriteFile(keys, []byte("# rotated\nnew-key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stack.Eventually(t, "the rotated key file in force", func() bool {
		return httpCode("new-key") == http.StatusOK && httpCode("old-key") == http.StatusUnauthorized
	})
	if err := generate("new-key"); err != nil {
		t.Fatalf("gRPC Generate with the rotated key: %v", err)
	}
	// A key file emptied by mistake keeps the keys in force.
	if err := os.WriteFile(keys, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stack.Eventually(t, "the router read the emptied key file", func() bool {
		return strings.Contains(s.Router.Log(), "API key file has no keys")
	})
	if httpCode("") != http.StatusUnauthorized || httpCode("new-key") != http.StatusOK {
		t.Fatal("an emptied key file changed the keys in force")
	}
	checkIdle(t, s)
	s.StopAll(t)
}
