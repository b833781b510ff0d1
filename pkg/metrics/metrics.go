// Package metrics defines kvferry's contract metrics (Health and metrics in the README) behind
// Record helpers. Each process builds one registry and passes it in; nothing
// registers on the default registry.
package metrics

import (
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/kvferry/kvferry/pkg/buildinfo"
)

const namespace = "kvferry"

// NewRegistry returns a registry with the Go and process collectors and
// kvferry_build_info.
// tls says whether the process's gRPC surfaces use TLS (the build_info
// label tls="true"/"false": a fleet query finds the plaintext ones).
func NewRegistry(tls bool) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	bi := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help: "Build of this process; always 1.",
	}, []string{"version", "commit", "go_version", "tls"})
	bi.WithLabelValues(buildinfo.Version, buildinfo.Commit, runtime.Version(), strconv.FormatBool(tls)).Set(1)
	reg.MustRegister(bi)
	return reg
}

// poolCollector reads a pool's counts at scrape time, so the gauges can
// never drift from the pool.
type poolCollector struct {
	pool     PoolGauges
	capacity *prometheus.Desc
	blocks   *prometheus.Desc
	cached   *prometheus.Desc
}

// PoolGauges is what the pool gauges read at scrape time (blockpool.Pool
// is one): an interface, so that this package — which the router links —
// does not link the block pool.
type PoolGauges interface {
	Capacity() int
	Cached() int
	// ByState is the number of blocks in each state, by state name.
	ByState() map[string]int
}

// RegisterPool exports kvferry_blockpool_capacity_blocks and
// kvferry_blockpool_blocks{state}.
func RegisterPool(reg prometheus.Registerer, pool PoolGauges) {
	reg.MustRegister(&poolCollector{
		pool:     pool,
		capacity: prometheus.NewDesc(namespace+"_blockpool_capacity_blocks", "Number of KV blocks in the pool.", nil, nil),
		blocks:   prometheus.NewDesc(namespace+"_blockpool_blocks", "Number of KV blocks in each state; the states sum to the capacity.", []string{"state"}, nil),
		cached:   prometheus.NewDesc(namespace+"_blockpool_cached_blocks", "Number of blocks in the prefix-reuse cache (each holds a reference, so counts among owned).", nil, nil),
	})
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.capacity
	ch <- c.blocks
	ch <- c.cached
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, float64(c.pool.Capacity()))
	ch <- prometheus.MustNewConstMetric(c.cached, prometheus.GaugeValue, float64(c.pool.Cached()))
	for state, n := range c.pool.ByState() {
		ch <- prometheus.MustNewConstMetric(c.blocks, prometheus.GaugeValue, float64(n), state)
	}
}

// Transfer sides and outcomes.
const (
	SideSender   = "sender"
	SideReceiver = "receiver"

	OutcomeCompleted = "completed"
	OutcomeFailed    = "failed"
	OutcomeCancelled = "cancelled"
	OutcomeTimedOut  = "timed_out"
)

// Transfer holds the transfer metrics of a server.
type Transfer struct {
	sessions *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewTransfer registers the transfer metrics.
func NewTransfer(reg prometheus.Registerer) *Transfer {
	t := &Transfer{
		sessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "transfer", Name: "sessions_total",
			Help: "Transfer sessions ended, by side and logical outcome.",
		}, []string{"side", "outcome"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "transfer", Name: "bytes_total",
			Help: "KV bytes moved by transfer sessions.",
		}, []string{"side"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "transfer", Name: "duration_seconds",
			Help:    "Duration of transfer sessions, from transfer start to the logical outcome.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18),
		}, []string{"side"}),
	}
	for _, side := range []string{SideSender, SideReceiver} {
		for _, o := range []string{OutcomeCompleted, OutcomeFailed, OutcomeCancelled, OutcomeTimedOut} {
			t.sessions.WithLabelValues(side, o)
		}
		t.bytes.WithLabelValues(side)
		t.duration.WithLabelValues(side)
	}
	reg.MustRegister(t.sessions, t.bytes, t.duration)
	return t
}

// RecordTransfer counts one ended session with its bytes and duration, all
// from the same transfer.
func (t *Transfer) RecordTransfer(side, outcome string, bytes int64, d time.Duration) {
	t.sessions.WithLabelValues(side, outcome).Inc()
	t.bytes.WithLabelValues(side).Add(float64(bytes))
	t.duration.WithLabelValues(side).Observe(d.Seconds())
}

// Cancel holds the cancel metrics of a server.
type Cancel struct {
	outcomes *prometheus.CounterVec
	toFree   prometheus.Histogram
}

// CancelOutcomes are the six outcomes in lower snake case.
var CancelOutcomes = []string{"not_found", "already_complete", "cancelled_before_advertise", "cancel_requested_in_flight", "backend_unhealthy", "not_cancellable"}

// NewCancel registers the cancel metrics.
func NewCancel(reg prometheus.Registerer) *Cancel {
	c := &Cancel{
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "cancel", Name: "outcomes_total",
			Help: "Cancel requests answered, by structured outcome.",
		}, []string{"outcome"}),
		toFree: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "cancel_to_free_seconds",
			Help:    "Time from a cancel received to the request's last block released.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 20),
		}),
	}
	for _, o := range CancelOutcomes {
		c.outcomes.WithLabelValues(o)
	}
	reg.MustRegister(c.outcomes, c.toFree)
	return c
}

// RecordOutcome counts one cancel outcome, given as its proto enum name
// (CANCEL_OUTCOME_NOT_FOUND) or lower snake case.
func (c *Cancel) RecordOutcome(outcome string) {
	c.outcomes.WithLabelValues(strings.ToLower(strings.TrimPrefix(outcome, "CANCEL_OUTCOME_"))).Inc()
}

// RecordCancelToFree observes the time from cancel to the last block freed.
func (c *Cancel) RecordCancelToFree(d time.Duration) { c.toFree.Observe(d.Seconds()) }

// Router request outcomes.
const (
	RequestOK        = "ok"
	RequestCancelled = "cancelled"
	RequestError     = "error"
	RequestRejected  = "rejected"
)

// Router holds the router's request metrics.
type Router struct {
	requests        *prometheus.CounterVec
	ttft            prometheus.Histogram
	interToken      prometheus.Histogram
	duration        *prometheus.HistogramVec
	retries         prometheus.Counter
	backendInflight *prometheus.GaugeVec
	cancelOutcomes  *prometheus.CounterVec
	inflight        prometheus.Gauge
	readingBodies   prometheus.Gauge
	prefixBlocks    *prometheus.CounterVec
	digestBlocks    *prometheus.GaugeVec
}

// NewRouter registers the router metrics.
func NewRouter(reg prometheus.Registerer) *Router {
	latency := prometheus.ExponentialBuckets(0.001, 2, 18)
	r := &Router{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "router", Name: "requests_total",
			Help: "Requests finished by the router, by outcome.",
		}, []string{"outcome"}),
		ttft: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "router", Name: "ttft_seconds",
			Help: "Time from request accepted to the first token sent to the client.", Buckets: latency,
		}),
		interToken: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "router", Name: "inter_token_seconds",
			Help: "Time between consecutive tokens sent to the client.", Buckets: latency,
		}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "router", Name: "request_duration_seconds",
			Help: "End-to-end request duration, by outcome.", Buckets: latency,
		}, []string{"outcome"}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "router", Name: "retries_total",
			Help: "Attempts after the first, made after a server failure before any token reached the client.",
		}),
		cancelOutcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "router", Name: "cancel_outcomes_total",
			Help: "Cancels the router fanned out, by server role and the server's answer (error when it could not be asked).",
		}, []string{"role", "outcome"}),
		backendInflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "router", Name: "backend_inflight_requests",
			Help: "Requests in flight on each server, as the router counts them.",
		}, []string{"role", "server"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "router", Name: "inflight_requests",
			Help: "Requests holding an in-flight slot (--max-inflight bounds them).",
		}),
		prefixBlocks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "prefix", Name: "blocks_total",
			Help: "Prompt blocks and the prefix cache, by kind: requested (full blocks of prompts routed), available (of those, the most any context server's cache held, by its last digest), routed (held by the server chosen), reused (the server reused).",
		}, []string{"kind"}),
		digestBlocks: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "router", Name: "prefix_digest_blocks",
			Help: "Blocks in each context server's prefix cache, as its last PrefixDigest listed them.",
		}, []string{"server"}),
		readingBodies: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "router", Name: "reading_body_requests",
			Help: "HTTP requests whose body is still arriving; they hold no in-flight slot and --body-read-timeout bounds them.",
		}),
	}
	for _, o := range []string{RequestOK, RequestCancelled, RequestError, RequestRejected} {
		r.requests.WithLabelValues(o)
		r.duration.WithLabelValues(o)
	}
	for _, role := range []string{"context", "generation"} {
		for _, o := range append(append([]string{}, CancelOutcomes...), "error") {
			r.cancelOutcomes.WithLabelValues(role, o)
		}
	}
	reg.MustRegister(r.requests, r.ttft, r.interToken, r.duration, r.retries, r.backendInflight, r.cancelOutcomes, r.inflight, r.readingBodies, r.prefixBlocks, r.digestBlocks)
	for _, k := range []string{"requested", "available", "routed", "reused"} {
		r.prefixBlocks.WithLabelValues(k)
	}
	return r
}

// RecordAttempt counts an attempt (retry = true for attempt 2 and later).
func (r *Router) RecordAttempt(retry bool) {
	if retry {
		r.retries.Inc()
	}
}

// RecordCancelOutcome counts one server's answer to a fanned-out cancel:
// outcome is the proto enum name or "error".
func (r *Router) RecordCancelOutcome(role, outcome string) {
	r.cancelOutcomes.WithLabelValues(role, strings.ToLower(strings.TrimPrefix(outcome, "CANCEL_OUTCOME_"))).Inc()
}

// RecordBackendInflight sets one server's requests in flight.
func (r *Router) RecordBackendInflight(role, server string, n int64) {
	r.backendInflight.WithLabelValues(role, server).Set(float64(n))
}

// RecordPrefix counts a routed prompt's full blocks, how many of them
// the best context server's cache held and how many the chosen one held.
func (r *Router) RecordPrefix(requested, available, routed int) {
	r.prefixBlocks.WithLabelValues("requested").Add(float64(requested))
	r.prefixBlocks.WithLabelValues("available").Add(float64(available))
	r.prefixBlocks.WithLabelValues("routed").Add(float64(routed))
}

// RecordPrefixDigest sets the blocks a context server's last digest listed.
func (r *Router) RecordPrefixDigest(server string, blocks int) {
	r.digestBlocks.WithLabelValues(server).Set(float64(blocks))
}

// RecordPrefixReused counts the blocks a context server reused.
func (r *Router) RecordPrefixReused(n int) { r.prefixBlocks.WithLabelValues("reused").Add(float64(n)) }

// AddInflight moves the count of requests holding an in-flight slot.
func (r *Router) AddInflight(delta int) { r.inflight.Add(float64(delta)) }

// AddReadingBody moves the count of requests whose body is arriving.
func (r *Router) AddReadingBody(delta int) { r.readingBodies.Add(float64(delta)) }

// ForgetBackend deletes the series of a server discovery removed.
func (r *Router) ForgetBackend(role, server string) {
	r.backendInflight.DeleteLabelValues(role, server)
	r.digestBlocks.DeleteLabelValues(server)
}

// RecordRequest counts one finished request and its duration.
func (r *Router) RecordRequest(outcome string, d time.Duration) {
	r.requests.WithLabelValues(outcome).Inc()
	r.duration.WithLabelValues(outcome).Observe(d.Seconds())
}

// RecordTTFT observes time to first token.
func (r *Router) RecordTTFT(d time.Duration) { r.ttft.Observe(d.Seconds()) }

// RecordInterToken observes the gap between two tokens.
func (r *Router) RecordInterToken(d time.Duration) { r.interToken.Observe(d.Seconds()) }

// Health holds the health gauges.
type Health struct {
	live, ready, sinceProgress, poisonBudget prometheus.Gauge
}

// NewHealth registers kvferry_health_live, _ready, _seconds_since_progress
// and _poison_budget_blocks.
func NewHealth(reg prometheus.Registerer) *Health {
	h := &Health{
		live:          prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: "health", Name: "live", Help: "1 when the process is live, else 0."}),
		ready:         prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: "health", Name: "ready", Help: "1 when the process is ready for traffic, else 0."}),
		sinceProgress: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: "health", Name: "seconds_since_progress", Help: "Seconds since the last global progress while work was pending; 0 when idle."}),
		poisonBudget:  prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: "health", Name: "poison_budget_blocks", Help: "Poisoned blocks past which liveness fails (--poison-budget); 0 where no pool is held."}),
	}
	reg.MustRegister(h.live, h.ready, h.sinceProgress, h.poisonBudget)
	return h
}

// RecordPoisonBudget sets the poisoned-block budget the checker enforces.
func (h *Health) RecordPoisonBudget(blocks int) { h.poisonBudget.Set(float64(blocks)) }

// RecordHealth sets the health gauges.
func (h *Health) RecordHealth(live, ready bool, sinceProgress time.Duration) {
	h.live.Set(boolGauge(live))
	h.ready.Set(boolGauge(ready))
	h.sinceProgress.Set(sinceProgress.Seconds())
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Quarantine counts sessions that ended in doubt and blocks poisoned.
type Quarantine struct {
	quarantined *prometheus.CounterVec
	poisoned    *prometheus.CounterVec
}

// NewQuarantine registers kvferry_transfer_quarantined_sessions_total and
// kvferry_blockpool_poisoned_blocks_total.
func NewQuarantine(reg prometheus.Registerer) *Quarantine {
	q := &Quarantine{
		quarantined: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "transfer", Name: "quarantined_sessions_total",
			Help: "Transfer sessions that ended with quiescence unproven; their blocks were quarantined.",
		}, []string{"side"}),
		poisoned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "blockpool", Name: "poisoned_blocks_total",
			Help: "Blocks poisoned because quiescence was never proven before the quarantine deadline.",
		}, []string{"side"}),
	}
	for _, side := range []string{SideSender, SideReceiver} {
		q.quarantined.WithLabelValues(side)
		q.poisoned.WithLabelValues(side)
	}
	reg.MustRegister(q.quarantined, q.poisoned)
	return q
}

// RecordQuarantine counts one session quarantined.
func (q *Quarantine) RecordQuarantine(side string) { q.quarantined.WithLabelValues(side).Inc() }

// RecordPoison counts blocks poisoned.
func (q *Quarantine) RecordPoison(side string, blocks int) {
	q.poisoned.WithLabelValues(side).Add(float64(blocks))
}

// QuarantinedCounter returns the quarantined-sessions counter of one side,
// for tests.
func (q *Quarantine) QuarantinedCounter(side string) prometheus.Collector {
	return q.quarantined.WithLabelValues(side)
}

// Canary counts pair-canary results.
type Canary struct {
	results  *prometheus.CounterVec
	duration prometheus.Histogram
}

// NewCanary registers kvferry_health_canary_total{result} and
// kvferry_health_canary_duration_seconds.
func NewCanary(reg prometheus.Registerer) *Canary {
	c := &Canary{
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "health", Name: "canary_total",
			Help: "Pair canaries (a one-block transfer from a context server, checksum-verified), by result.",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "health", Name: "canary_duration_seconds",
			Help: "Duration of one pair canary.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
	}
	c.results.WithLabelValues("ok")
	c.results.WithLabelValues("failed")
	reg.MustRegister(c.results, c.duration)
	return c
}

// RecordCanary counts one canary result ("ok" or "failed") and its duration.
func (c *Canary) RecordCanary(result string, d time.Duration) {
	c.results.WithLabelValues(result).Inc()
	c.duration.Observe(d.Seconds())
}

// Scheduler holds the scheduler's metrics: the decode loop's batches, the
// prefill loop's batches and the admission queue in front of the pool.
type Scheduler struct {
	batch          prometheus.Histogram
	running        prometheus.Gauge
	prefillPrompts prometheus.Histogram
	prefillTokens  prometheus.Histogram
	wait           prometheus.Histogram
	waiting        prometheus.Gauge
}

// NewScheduler registers the scheduler's metrics.
func NewScheduler(reg prometheus.Registerer) *Scheduler {
	s := &Scheduler{
		batch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "scheduler", Name: "batch_sequences",
			Help: "Sequences per engine decode step (continuous batching).", Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		running: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "scheduler", Name: "running_sequences",
			Help: "Sequences in the decode loop.",
		}),
		prefillPrompts: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "scheduler", Name: "prefill_batch_prompts",
			Help: "Prompts per engine prefill step (prompts batched together).", Buckets: prometheus.ExponentialBuckets(1, 2, 8),
		}),
		prefillTokens: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "scheduler", Name: "prefill_batch_tokens",
			Help: "Prompt tokens per engine prefill step (at most --max-batch-tokens).", Buckets: prometheus.ExponentialBuckets(1, 4, 8),
		}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "scheduler", Name: "queue_seconds",
			Help: "Time from arrival to admission (the blocks were available and it was the request's turn).", Buckets: prometheus.ExponentialBuckets(0.0001, 4, 12),
		}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "scheduler", Name: "waiting_requests",
			Help: "Requests waiting for KV blocks.",
		}),
	}
	reg.MustRegister(s.batch, s.running, s.prefillPrompts, s.prefillTokens, s.wait, s.waiting)
	return s
}

// RecordBatch observes one decode step over n sequences, with running
// sequences in the loop after it.
func (s *Scheduler) RecordBatch(n, running int) {
	s.batch.Observe(float64(n))
	s.running.Set(float64(running))
}

// RecordPrefillBatch observes one prefill step over prompts and tokens.
func (s *Scheduler) RecordPrefillBatch(prompts, tokens int) {
	s.prefillPrompts.Observe(float64(prompts))
	s.prefillTokens.Observe(float64(tokens))
}

// RecordQueue observes one admission's wait (wait < 0: none, only the
// number waiting changed).
func (s *Scheduler) RecordQueue(wait time.Duration, waiting int) {
	if wait >= 0 {
		s.wait.Observe(wait.Seconds())
	}
	s.waiting.Set(float64(waiting))
}
