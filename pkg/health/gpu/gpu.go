// Package gpu watches NVIDIA GPUs through NVML (github.com/NVIDIA/go-nvml):
// per GPU its name, memory, temperature, utilisation, uncorrected ECC
// errors and critical XID events. A machine without the NVIDIA library has
// no GPU, which is not an error. Uncorrected ECC errors or a critical XID
// make a GPU unhealthy, which fails readiness (pkg/health).
//
// NVML calls are made only from Poll, by the monitor's owner goroutine, and
// never under the snapshot lock; Snapshot never blocks on NVML.
package gpu

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kvferry/kvferry/pkg/metrics"
	"github.com/kvferry/kvferry/pkg/routine"
	kvferryv1 "github.com/kvferry/kvferry/proto/kvferry/v1"
)

// Monitor polls NVML. Create it with New, drive it with Run (or Poll), read
// it with Snapshot, end it with Shutdown.
type Monitor struct {
	lib     nvml.Interface
	lg      *zap.Logger
	present bool
	devices []nvml.Device
	events  nvml.EventSet // nil when events are unsupported
	xids    []uint64      // critical XID events seen, per device
	engine  []bool        // the serving engine computes on the device (UseByEngine)

	gauges *metrics.GPU

	mu   sync.Mutex
	snap []*kvferryv1.GpuStatus
}

// New initialises NVML through lib (nvml.New() in production). A missing
// library means no GPU: logged once at info. Any other failure is logged as
// a warning and also means no GPU is watched.
func New(lib nvml.Interface, reg prometheus.Registerer, lg *zap.Logger) *Monitor {
	m := &Monitor{lib: lib, lg: lg, gauges: metrics.NewGPU(reg)}
	switch ret := lib.Init(); ret {
	case nvml.SUCCESS:
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		lg.Info("no GPU: NVIDIA management library not found")
		return m
	default:
		lg.Warn("no GPU: NVML init failed", zap.String("error", lib.ErrorString(ret)))
		return m
	}
	n, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		lg.Warn("NVML device count failed", zap.String("error", lib.ErrorString(ret)))
		_ = lib.Shutdown()
		return m
	}
	m.present = true
	es, ret := lib.EventSetCreate()
	if ret == nvml.SUCCESS {
		m.events = es
	}
	for i := range n {
		d, ret := lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			lg.Warn("NVML device handle failed", zap.Int("gpu", i), zap.String("error", lib.ErrorString(ret)))
			continue
		}
		m.devices = append(m.devices, d)
		if m.events != nil {
			if ret := d.RegisterEvents(nvml.EventTypeXidCriticalError, m.events); ret != nvml.SUCCESS && ret != nvml.ERROR_NOT_SUPPORTED {
				lg.Warn("NVML XID events unavailable", zap.Int("gpu", i), zap.String("error", lib.ErrorString(ret)))
			}
		}
	}
	m.xids = make([]uint64, len(m.devices))
	m.engine = make([]bool, len(m.devices))
	m.gauges.RecordDevices(len(m.devices))
	lg.Info("GPUs found", zap.Int("gpus", len(m.devices)))
	return m
}

// UseByEngine marks the GPUs the serving engine computes on, given their
// names as the engine's backend reports them (llama.cpp's CUDA device
// descriptions, in CUDA order). Each name takes the first unmarked NVML
// device of that name, so identical GPUs are matched in NVML's (PCI) order
// — exact when CUDA_DEVICE_ORDER=PCI_BUS_ID, which CUDA uses for identical
// devices anyway. Call it before Run. It returns the engine names no NVML
// device matched (logged too).
func (m *Monitor) UseByEngine(names []string) []string {
	var unmatched []string
	for _, name := range names {
		if i := m.unmarked(name); i >= 0 {
			m.engine[i] = true
		} else {
			unmatched = append(unmatched, name)
		}
	}
	if len(unmatched) > 0 {
		m.lg.Warn("engine GPUs NVML does not report", zap.Strings("gpus", unmatched))
	}
	return unmatched
}

// unmarked is the first device named name not yet the engine's, or -1.
func (m *Monitor) unmarked(name string) int {
	for i, d := range m.devices {
		if n, ret := d.GetName(); ret == nvml.SUCCESS && n == name && !m.engine[i] {
			return i
		}
	}
	return -1
}

// Present reports whether NVML is loaded.
func (m *Monitor) Present() bool { return m.present }

// Run polls every interval until ctx is done.
func (m *Monitor) Run(ctx context.Context, interval time.Duration) {
	if !m.present {
		return
	}
	m.Poll()
	routine.Every(ctx, interval, func(time.Time) { m.Poll() })
}

// Poll reads every GPU once, drains pending XID events and publishes.
func (m *Monitor) Poll() {
	if !m.present {
		return
	}
	m.drainEvents()
	out := make([]*kvferryv1.GpuStatus, len(m.devices))
	for i, d := range m.devices {
		out[i] = m.read(i, d)
	}
	m.mu.Lock()
	m.snap = out
	m.mu.Unlock()
}

// drainEvents takes every queued event without waiting (timeout 0).
func (m *Monitor) drainEvents() {
	if m.events == nil {
		return
	}
	for {
		e, ret := m.events.Wait(0)
		if ret != nvml.SUCCESS {
			return // ERROR_TIMEOUT: none queued
		}
		if e.EventType&nvml.EventTypeXidCriticalError == 0 {
			continue
		}
		for i, d := range m.devices {
			if d == e.Device {
				m.xids[i]++
				m.lg.Error("GPU critical XID event", zap.Int("gpu", i), zap.Uint64("xid", e.EventData))
			}
		}
	}
}

func (m *Monitor) read(i int, d nvml.Device) *kvferryv1.GpuStatus {
	g := &kvferryv1.GpuStatus{Index: uint32(i), Healthy: true, CriticalXidEvents: m.xids[i], Engine: m.engine[i]}
	var errs []error
	check := func(what string, ret nvml.Return) bool {
		if ret == nvml.SUCCESS {
			return true
		}
		if ret != nvml.ERROR_NOT_SUPPORTED {
			errs = append(errs, fmt.Errorf("%s: %s", what, m.lib.ErrorString(ret)))
		}
		return false
	}
	var ret nvml.Return
	if g.Name, ret = d.GetName(); !check("name", ret) {
		g.Name = "unknown"
	}
	if mem, ret := d.GetMemoryInfo(); check("memory", ret) {
		g.MemoryTotalBytes, g.MemoryUsedBytes = mem.Total, mem.Used
	}
	if t, ret := d.GetTemperature(nvml.TEMPERATURE_GPU); check("temperature", ret) {
		g.TemperatureCelsius = t
	}
	if u, ret := d.GetUtilizationRates(); check("utilization", ret) {
		g.UtilizationPercent = u.Gpu
	}
	if e, ret := d.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); check("ecc", ret) {
		g.EccUncorrectedErrors = e
	}
	switch {
	case g.EccUncorrectedErrors > 0:
		g.Healthy, g.Reason = false, fmt.Sprintf("%d uncorrected ECC errors", g.EccUncorrectedErrors)
	case g.CriticalXidEvents > 0:
		g.Healthy, g.Reason = false, fmt.Sprintf("%d critical XID events", g.CriticalXidEvents)
	}
	if len(errs) > 0 {
		m.lg.Debug("NVML query failed", zap.Int("gpu", i), zap.Error(errors.Join(errs...)))
	}
	m.gauges.RecordGPU(i, g)
	return g
}

// Snapshot returns the last poll: whether NVML is present and each GPU.
func (m *Monitor) Snapshot() (bool, []*kvferryv1.GpuStatus) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.present, m.snap
}

// Shutdown frees the event set and shuts NVML down. Safe to call twice.
func (m *Monitor) Shutdown() {
	if !m.present {
		return
	}
	m.present = false
	if m.events != nil {
		_ = m.events.Free()
	}
	_ = m.lib.Shutdown()
}
