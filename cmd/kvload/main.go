// Command kvload is a load generator for any OpenAI-compatible endpoint:
// streaming completions or chat at fixed concurrencies (closed loop) or
// request rates (open loop, Poisson), with a share of requests cancelled
// by the client. It measures TTFT, every inter-token gap, end-to-end
// latency, tokens and outcomes; writes DIR/results.json (schema kvload/1)
// and PNG charts; `kvload compare a.json b.json` draws two runs side by
// side, and `kvload plot results.json` redraws a run's charts.
//
//	kvload --url http://127.0.0.1:8000/v1 --model tiny --concurrency 1,8,32 --requests 200 --max-tokens 128 --out out
//	kvload compare out/results.json other/results.json --out cmp
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kvferry/kvferry/pkg/buildinfo"
	"github.com/kvferry/kvferry/pkg/flagenv"
	"github.com/kvferry/kvferry/pkg/loadgen"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch {
	case len(os.Args) > 1 && os.Args[1] == "compare":
		err = compare(os.Args[2:], os.Stdout)
	case len(os.Args) > 1 && os.Args[1] == "plot":
		err = replot(os.Args[2:], os.Stdout)
	default:
		err = run(ctx, os.Args[1:], os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kvload:", err)
		os.Exit(1)
	}
}

// config is the command line of a run.
type config struct {
	target      loadgen.Target
	concurrency []int
	rates       []float64
	requests    int
	duration    time.Duration
	prompts     string
	promptWords string
	sharedWords int
	sharedCount int
	maxTokens   string
	abortRate   float64
	slo         loadgen.SLO
	seed        uint64
	out         string
	label       string
	noPlots     bool
}

func parse(args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("kvload", flag.ContinueOnError)
	fs.StringVar(&c.target.URL, "url", "", "base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1 (required)")
	fs.StringVar(&c.target.APIKey, "api-key", "", "bearer key (default: none)")
	fs.StringVar(&c.target.Model, "model", "", "model name (required)")
	fs.BoolVar(&c.target.Chat, "chat", false, "send chat completions (one user message) instead of completions")
	fs.BoolVar(&c.target.IgnoreEOS, "ignore-eos", false, "ask the server to generate max_tokens past end-of-text (ignore_eos; vLLM and kvferry honour it)")
	fs.DurationVar(&c.target.Timeout, "timeout", 5*time.Minute, "bound on one request")
	concurrency := fs.String("concurrency", "", "closed loop: comma-separated concurrencies, one level each (e.g. 1,8,32)")
	rates := fs.String("rate", "", "open loop: comma-separated request rates in req/s, Poisson arrivals, one level each")
	fs.IntVar(&c.requests, "requests", 0, "requests per level")
	fs.DurationVar(&c.duration, "duration", 0, "duration of each level (with --requests, whichever ends first)")
	fs.StringVar(&c.prompts, "prompts", "", "JSONL file of prompts, one {\"prompt\": \"...\", \"max_tokens\": N} a line (max_tokens optional)")
	fs.StringVar(&c.promptWords, "prompt-words", "uniform:32:256", "prompt length in words when no --prompts: N, fixed:N, uniform:LO:HI or normal:MEAN:SD (each word at random: prompts share no prefix but by chance)")
	fs.IntVar(&c.sharedWords, "shared-prefix-words", 0, "with --prompt-words: every prompt starts with the same this many words (a system prompt; measures prefix caching), then its own --prompt-words")
	fs.IntVar(&c.sharedCount, "shared-prefixes", 1, "with --shared-prefix-words: this many different shared prefixes (several tenants' system prompts), each prompt starting with one at random")
	fs.StringVar(&c.maxTokens, "max-tokens", "128", "max_tokens of each request: N, fixed:N, uniform:LO:HI or normal:MEAN:SD")
	fs.Float64Var(&c.abortRate, "abort-rate", 0, "share of requests the client cancels, each at a random token position below its max_tokens (an answer that ends before its position completes; with --ignore-eos the share is exact) (0 to 1)")
	fs.DurationVar(&c.slo.TTFT, "slo-ttft", 0, "goodput: a request must have its first token within this (0: not checked)")
	fs.DurationVar(&c.slo.ITL, "slo-itl", 0, "goodput: a request's mean inter-token gap must be within this (0: not checked)")
	fs.DurationVar(&c.slo.MaxITL, "slo-itl-max", 0, "goodput: a request's longest inter-token gap (a stall the reader sees) must be within this (0: not checked)")
	fs.Uint64Var(&c.seed, "seed", 1, "seed of prompts, lengths, aborts and arrivals")
	fs.StringVar(&c.out, "out", "kvload-out", "directory for results.json and the charts")
	fs.StringVar(&c.label, "label", "", "name of this run in charts and comparisons (default: the URL's host)")
	fs.BoolVar(&c.noPlots, "no-plots", false, "write results.json only")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if err := flagenv.Apply(fs, os.LookupEnv); err != nil {
		return c, err
	}
	var errs []error
	if c.target.URL == "" || c.target.Model == "" {
		errs = append(errs, errors.New("--url and --model are required"))
	}
	u, err := url.Parse(c.target.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("--url %q: want http(s)://HOST[:PORT]/PATH", c.target.URL))
	} else if c.label == "" {
		c.label = u.Host
	}
	for _, s := range split(*concurrency) {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			errs = append(errs, fmt.Errorf("--concurrency: %q is not a positive integer", s))
		}
		c.concurrency = append(c.concurrency, n)
	}
	for _, s := range split(*rates) {
		r, err := strconv.ParseFloat(s, 64)
		if err != nil || !(r > 0) {
			errs = append(errs, fmt.Errorf("--rate: %q is not a positive number", s))
		}
		c.rates = append(c.rates, r)
	}
	if (len(c.concurrency) == 0) == (len(c.rates) == 0) {
		errs = append(errs, errors.New("give --concurrency or --rate (one of them)"))
	}
	if c.requests < 0 || c.duration < 0 || (c.requests == 0 && c.duration == 0) {
		errs = append(errs, errors.New("give --requests N or --duration D (per level)"))
	}
	if !(c.abortRate >= 0 && c.abortRate <= 1) {
		errs = append(errs, fmt.Errorf("--abort-rate must be between 0 and 1, got %g", c.abortRate))
	}
	if c.sharedCount < 1 {
		errs = append(errs, errors.New("--shared-prefixes must be at least 1"))
	}
	if c.sharedWords < 0 || (c.sharedWords > 0 && c.prompts != "") {
		errs = append(errs, errors.New("--shared-prefix-words must not be negative, and goes with --prompt-words, not --prompts"))
	}
	return c, errors.Join(errs...)
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	c, err := parse(args)
	if err != nil {
		return err
	}
	output, err := loadgen.ParseDist(c.maxTokens)
	if err != nil {
		return fmt.Errorf("--max-tokens: %w", err)
	}
	var prompts loadgen.Prompts
	promptDesc := c.prompts
	if c.prompts != "" {
		f, err := os.Open(c.prompts)
		if err != nil {
			return err
		}
		list, err := loadgen.ReadJSONL(f)
		f.Close()
		if err != nil {
			return err
		}
		prompts = list
	} else {
		d, err := loadgen.ParseDist(c.promptWords)
		if err != nil {
			return fmt.Errorf("--prompt-words: %w", err)
		}
		var prefixes []string
		if c.sharedWords > 0 {
			rng := rand.New(rand.NewPCG(c.seed, 0x5eed))
			for range c.sharedCount {
				prefixes = append(prefixes, loadgen.SharedPrefix(rng, c.sharedWords))
			}
		}
		prompts, promptDesc = loadgen.Synthetic{Words: d, Prefixes: prefixes}, "words "+d.String()
		if c.sharedWords > 0 {
			promptDesc = fmt.Sprintf("one of %d shared prefixes of %d words, then words %s", c.sharedCount, c.sharedWords, d)
		}
	}
	if err := os.MkdirAll(c.out, 0o755); err != nil {
		return err
	}
	runner := loadgen.NewRunner(c.target, loadgen.Workload{Prompts: prompts, Output: output, AbortRate: c.abortRate, Seed: c.seed})
	defer runner.Close()
	res := loadgen.Results{Schema: loadgen.Schema, Label: c.label, Settings: loadgen.Settings{
		URL: c.target.URL, Model: c.target.Model, Chat: c.target.Chat, Prompts: promptDesc, Output: output.String(),
		IgnoreEOS: c.target.IgnoreEOS, AbortRate: c.abortRate, Requests: c.requests, SLOTTFTMs: loadgen.Millis(c.slo.TTFT), SLOITLMs: loadgen.Millis(c.slo.ITL), SLOMaxITLMs: loadgen.Millis(c.slo.MaxITL),
		Seed: c.seed, Started: time.Now().UTC().Format(time.RFC3339), Version: buildinfo.Version,
	}}
	if c.duration > 0 {
		res.Settings.Duration = c.duration.String()
	}
	var levels []loadgen.Load
	for _, n := range c.concurrency {
		levels = append(levels, loadgen.Load{Concurrency: n, Requests: c.requests, Duration: c.duration})
	}
	for _, r := range c.rates {
		levels = append(levels, loadgen.Load{Rate: r, Requests: c.requests, Duration: c.duration})
	}
	tty := loadgen.IsTerminal(os.Stderr)
	for _, l := range levels {
		var onRecord func(loadgen.Record)
		var prog *loadgen.Progress
		if tty {
			prog = loadgen.NewProgress(os.Stderr, l.Name(), l.Requests, 200*time.Millisecond)
			onRecord = prog.Add
		}
		recs, wall, err := runner.Run(ctx, l, onRecord)
		if prog != nil {
			prog.Stop()
		}
		if err != nil {
			return err
		}
		sum := loadgen.Summarize(l, recs, wall, c.slo)
		res.Runs = append(res.Runs, sum)
		if !tty {
			fmt.Fprintln(os.Stderr, loadgen.LevelLine(l.Name(), sum)) // a log hears of each level as it ends
		}
		if ctx.Err() != nil {
			break // interrupted: keep what was measured
		}
	}
	path, err := res.Write(c.out)
	if err != nil {
		return err
	}
	printTable(stdout, res)
	fmt.Fprintln(stdout, "wrote", path)
	if !c.noPlots {
		paths, err := loadgen.WritePlots(c.out, res)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, "charts:", strings.Join(paths, " "))
	}
	return ctx.Err()
}

// printTable writes one row a level.
func printTable(w io.Writer, r loadgen.Results) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "load\tok\taborted\terrors\tttft p50\tttft p99\titl p50\titl p99\tlatency p50\ttok/s\treq/s\tgoodput/s\t")
	for _, s := range r.Runs {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.1f\t%.1f\t%.2f\t%.2f\t%.0f\t%.1f\t%.2f\t%.2f\t\n", s.Load().Name(), s.Completed, s.Aborted, s.Errors,
			s.TTFT.P50, s.TTFT.P99, s.ITL.P50, s.ITL.P99, s.Latency.P50, s.OutputTokensPerS, s.RequestsPerS, s.GoodputPerS)
	}
	_ = tw.Flush()
	for _, s := range r.Runs {
		for kind, n := range s.ErrorsByKind {
			fmt.Fprintf(w, "errors at %s: %s × %d\n", s.Load().Name(), kind, n)
		}
	}
}

// filesAndOut parses a subcommand's results files and its --out flag,
// which may come before, between or after them.
func filesAndOut(name string, args []string, defaultOut string) ([]string, string, error) {
	fs := flag.NewFlagSet("kvload "+name, flag.ContinueOnError)
	out := fs.String("out", defaultOut, "directory for the charts")
	var files []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return nil, "", err
		}
		if fs.NArg() == 0 {
			break
		}
		files = append(files, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if *out == "" {
		return files, "", nil // the caller picks
	}
	return files, *out, os.MkdirAll(*out, 0o755)
}

// replot redraws the charts of a results.json.
func replot(args []string, stdout io.Writer) error {
	files, out, err := filesAndOut("plot", args, "")
	if err != nil {
		return err
	}
	if len(files) != 1 {
		return errors.New("usage: kvload plot RESULTS.json [--out DIR] (default: the file's directory)")
	}
	r, err := loadgen.ReadResults(files[0])
	if err != nil {
		return err
	}
	if out == "" {
		out = filepath.Dir(files[0])
	}
	paths, err := loadgen.WritePlots(out, r)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, "charts:", strings.Join(paths, " "))
	return nil
}

// compare draws two results side by side.
func compare(args []string, stdout io.Writer) error {
	files, out, err := filesAndOut("compare", args, "kvload-compare")
	if err != nil {
		return err
	}
	if len(files) != 2 {
		return errors.New("usage: kvload compare A.json B.json [--out DIR]")
	}
	a, err := loadgen.ReadResults(files[0])
	if err != nil {
		return err
	}
	b, err := loadgen.ReadResults(files[1])
	if err != nil {
		return err
	}
	if a.Label == b.Label {
		a.Label, b.Label = a.Label+" (A)", b.Label+" (B)"
	}
	paths, err := loadgen.WriteCompare(out, a, b)
	if err != nil {
		return err
	}
	printTable(stdout, a)
	printTable(stdout, b)
	fmt.Fprintln(stdout, "charts:", strings.Join(paths, " "))
	return nil
}
