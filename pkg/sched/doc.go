// Package sched drives an engine (executor.Engine) for a server: the
// prefill loop (Prefiller: continuous batching of prompts in chunks), the
// decode loop (Decoder: one step over every running sequence), admission
// (Admission: waiting for blocks in arrival order, holding nothing), and
// the request table (Table: tickets, attempts, stages and cancel
// outcomes). It has no I/O of its own; the context and generation servers
// own one of each and map its sentinel errors to their protocol's codes.
package sched
