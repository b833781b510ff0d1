// Package loadgen drives an OpenAI-compatible endpoint with streaming
// requests and measures what a user of it sees: time to first token,
// every inter-token gap, end-to-end latency, tokens and outcomes, at
// fixed concurrencies (closed loop) or request rates (open loop, Poisson).
// cmd/kvload is its command line; the package holds no flags.
package loadgen

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
)

// Dist is a distribution of positive lengths (prompt words, output
// tokens).
type Dist interface {
	Sample(rng *rand.Rand) int
	String() string
}

type fixed int

func (f fixed) Sample(*rand.Rand) int { return int(f) }
func (f fixed) String() string        { return fmt.Sprintf("fixed:%d", int(f)) }

type uniform struct{ lo, hi int }

func (u uniform) Sample(rng *rand.Rand) int { return u.lo + rng.IntN(u.hi-u.lo+1) }
func (u uniform) String() string            { return fmt.Sprintf("uniform:%d:%d", u.lo, u.hi) }

type normal struct{ mean, sd float64 }

// Sample draws from the normal, rounded and clipped to at least 1.
func (n normal) Sample(rng *rand.Rand) int {
	return max(1, int(math.Round(n.mean+n.sd*rng.NormFloat64())))
}
func (n normal) String() string { return fmt.Sprintf("normal:%g:%g", n.mean, n.sd) }

// ParseDist reads "N" or "fixed:N", "uniform:LO:HI" or "normal:MEAN:SD".
func ParseDist(s string) (Dist, error) {
	parts := strings.Split(s, ":")
	nums := make([]float64, 0, 2)
	for _, p := range parts[1:] {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, fmt.Errorf("distribution %q: %q is not a number", s, p)
		}
		nums = append(nums, v)
	}
	positive := func(v float64) bool { return v >= 1 && v == math.Trunc(v) }
	switch {
	case len(parts) == 1:
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("distribution %q: want a positive integer, fixed:N, uniform:LO:HI or normal:MEAN:SD", s)
		}
		return fixed(n), nil
	case parts[0] == "fixed" && len(nums) == 1 && positive(nums[0]):
		return fixed(int(nums[0])), nil
	case parts[0] == "uniform" && len(nums) == 2 && positive(nums[0]) && positive(nums[1]) && nums[0] <= nums[1]:
		return uniform{int(nums[0]), int(nums[1])}, nil
	case parts[0] == "normal" && len(nums) == 2 && nums[0] >= 1 && nums[1] >= 0:
		return normal{nums[0], nums[1]}, nil
	}
	return nil, fmt.Errorf("distribution %q: want N, fixed:N, uniform:LO:HI (1 ≤ LO ≤ HI) or normal:MEAN:SD (MEAN ≥ 1, SD ≥ 0)", s)
}
