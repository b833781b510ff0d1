package metrics

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// GPU is the NVML gauges: how many devices, and each one's memory,
// temperature, utilisation and error counts, labelled by index.
type GPU struct {
	devices                                              prometheus.Gauge
	memTotal, memUsed, temp, util, ecc, xidTotal, engine *prometheus.GaugeVec
}

// NewGPU registers the GPU gauges.
func NewGPU(reg prometheus.Registerer) *GPU {
	vec := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Subsystem: "gpu", Name: name, Help: help}, []string{"gpu"})
	}
	g := &GPU{
		devices:  prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: "gpu", Name: "devices", Help: "Number of NVIDIA GPUs NVML reports; 0 without the NVIDIA library."}),
		memTotal: vec("memory_total_bytes", "GPU memory in total."),
		memUsed:  vec("memory_used_bytes", "GPU memory in use."),
		temp:     vec("temperature_celsius", "GPU core temperature."),
		util:     vec("utilization_ratio", "Fraction of the last sample period the GPU was busy."),
		ecc:      vec("ecc_uncorrected_errors", "Uncorrected ECC errors since the driver loaded (volatile counter)."),
		xidTotal: vec("critical_xid_events", "Critical XID events seen since this process started."),
		engine:   vec("engine", "1 when the serving engine computes on this GPU (then only the engine's GPUs decide readiness)."),
	}
	reg.MustRegister(g.devices, g.memTotal, g.memUsed, g.temp, g.util, g.ecc, g.xidTotal, g.engine)
	return g
}

// RecordDevices sets how many GPUs NVML reports.
func (g *GPU) RecordDevices(n int) { g.devices.Set(float64(n)) }

// RecordGPU sets the gauges of GPU index from its polled status.
func (g *GPU) RecordGPU(index int, s *kvferryv1.GpuStatus) {
	label := strconv.Itoa(index)
	g.memTotal.WithLabelValues(label).Set(float64(s.GetMemoryTotalBytes()))
	g.memUsed.WithLabelValues(label).Set(float64(s.GetMemoryUsedBytes()))
	g.temp.WithLabelValues(label).Set(float64(s.GetTemperatureCelsius()))
	g.util.WithLabelValues(label).Set(float64(s.GetUtilizationPercent()) / 100)
	g.ecc.WithLabelValues(label).Set(float64(s.GetEccUncorrectedErrors()))
	g.xidTotal.WithLabelValues(label).Set(float64(s.GetCriticalXidEvents()))
	engine := 0.0
	if s.GetEngine() {
		engine = 1
	}
	g.engine.WithLabelValues(label).Set(engine)
}
