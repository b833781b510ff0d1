package loadgen

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Schema names the version of results.json; a reader refuses others.
const Schema = "kvload/1"

// Settings are what a run was asked to do, kept beside its figures.
type Settings struct {
	URL       string  `json:"url"`
	Model     string  `json:"model"`
	Chat      bool    `json:"chat"`
	Prompts   string  `json:"prompts"` // a file, or the word-count distribution
	Output    string  `json:"output_tokens"`
	IgnoreEOS bool    `json:"ignore_eos"`
	AbortRate float64 `json:"abort_rate"`
	Requests  int     `json:"requests_per_level,omitempty"`
	Duration  string  `json:"duration_per_level,omitempty"`
	SLOTTFTMs float64 `json:"slo_ttft_ms,omitempty"`
	SLOITLMs  float64 `json:"slo_itl_ms,omitempty"`
	// SLOMaxITLMs bounds a request's longest gap (--slo-itl-max).
	SLOMaxITLMs float64 `json:"slo_itl_max_ms,omitempty"`
	Seed        uint64  `json:"seed"`
	Started     string  `json:"started"`
	Version     string  `json:"kvload_version"`
}

// Results is results.json: one Summary a load level under Runs.
type Results struct {
	Schema   string    `json:"schema"`
	Label    string    `json:"label"`
	Settings Settings  `json:"settings"`
	Runs     []Summary `json:"runs"`
}

// Write writes results.json into dir.
func (r Results) Write(dir string) (string, error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "results.json")
	return path, os.WriteFile(path, append(b, '\n'), 0o644)
}

// ReadResults reads a results.json of this schema.
func ReadResults(path string) (Results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Results{}, err
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return Results{}, fmt.Errorf("%s: %w", path, err)
	}
	if r.Schema != Schema {
		return Results{}, fmt.Errorf("%s: schema %q, this kvload reads %q", path, r.Schema, Schema)
	}
	return r, nil
}
