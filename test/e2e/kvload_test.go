package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/kvferry/kvferry/pkg/loadgen"
	"github.com/kvferry/kvferry/test/stack"
)

// TestKvload runs the kvload binary against a stack at two concurrencies
// with a third of the requests aborted by the client: every request
// completes or is aborted (no error), the figures are there, the charts
// are written, and every pool idles afterwards.
func TestKvload(t *testing.T) {
	s := stack.Up(t, binDir, stack.Options{})
	out := t.TempDir()
	cmd := exec.Command(filepath.Join(binDir, "kvload"), "--url", s.OpenAIURL, "--model", "tiny", "--concurrency", "1,4",
		"--requests", "24", "--max-tokens", "uniform:4:24", "--prompt-words", "uniform:4:64", "--abort-rate", "0.3", "--ignore-eos",
		"--slo-ttft", "5s", "--out", out)
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("kvload: %v\n%s", err, b)
	}
	res, err := loadgen.ReadResults(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Runs) != 2 || res.Runs[0].Concurrency != 1 || res.Runs[1].Concurrency != 4 {
		t.Fatalf("levels %+v", res.Runs)
	}
	for _, r := range res.Runs {
		if r.Requests != 24 || r.Errors != 0 || r.Completed+r.Aborted != 24 || r.Completed == 0 {
			t.Fatalf("c=%d: %+v\n%s", r.Concurrency, r, b)
		}
		if r.TTFT.P50 <= 0 || r.Latency.P50 < r.TTFT.P50 || r.OutputTokensPerS <= 0 || r.PromptTokens == 0 {
			t.Fatalf("c=%d figures: %+v", r.Concurrency, r)
		}
	}
	for _, png := range []string{"ttft_cdf.png", "itl_cdf.png", "latency_cdf.png", "ttft_vs_load.png", "itl_vs_load.png", "throughput_vs_load.png"} {
		if st, err := os.Stat(filepath.Join(out, png)); err != nil || st.Size() == 0 {
			t.Errorf("chart %s: %v", png, err)
		}
	}
	for _, sub := range [][]string{
		{"compare", filepath.Join(out, "results.json"), filepath.Join(out, "results.json"), "--out", filepath.Join(out, "cmp")},
		{"plot", filepath.Join(out, "results.json"), "--out", filepath.Join(out, "again")},
	} {
		if b, err := exec.Command(filepath.Join(binDir, "kvload"), sub...).CombinedOutput(); err != nil {
			t.Fatalf("kvload %s: %v\n%s", sub[0], err, b)
		}
	}
	for _, png := range []string{"cmp/compare_throughput.png", "again/ttft_vs_load.png"} {
		if st, err := os.Stat(filepath.Join(out, png)); err != nil || st.Size() == 0 {
			t.Errorf("chart %s: %v", png, err)
		}
	}
	checkIdle(t, s)
}
