package gpu

import (
	"slices"
	"strconv"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// fakeGPU is one mock device with settable ECC count.
type fakeGPU struct {
	ecc uint64
	dev *mock.Device
}

func newFakeGPU(name string) *fakeGPU {
	g := &fakeGPU{}
	g.dev = &mock.Device{
		GetNameFunc:       func() (string, nvml.Return) { return name, nvml.SUCCESS },
		GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) { return nvml.Memory{Total: 80 << 30, Used: 10 << 30}, nvml.SUCCESS },
		GetTemperatureFunc: func(nvml.TemperatureSensors) (uint32, nvml.Return) {
			return 41, nvml.SUCCESS
		},
		GetUtilizationRatesFunc: func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{Gpu: 37}, nvml.SUCCESS },
		GetTotalEccErrorsFunc: func(t nvml.MemoryErrorType, c nvml.EccCounterType) (uint64, nvml.Return) {
			if t != nvml.MEMORY_ERROR_TYPE_UNCORRECTED || c != nvml.VOLATILE_ECC {
				return 0, nvml.ERROR_INVALID_ARGUMENT
			}
			return g.ecc, nvml.SUCCESS
		},
		RegisterEventsFunc: func(uint64, nvml.EventSet) nvml.Return { return nvml.SUCCESS },
	}
	return g
}

func fakeLib(gpus []*fakeGPU, events *[]nvml.EventData) *mock.Interface {
	es := &mock.EventSet{
		WaitFunc: func(uint32) (nvml.EventData, nvml.Return) {
			if len(*events) == 0 {
				return nvml.EventData{}, nvml.ERROR_TIMEOUT
			}
			e := (*events)[0]
			*events = (*events)[1:]
			return e, nvml.SUCCESS
		},
		FreeFunc: func() nvml.Return { return nvml.SUCCESS },
	}
	return &mock.Interface{
		InitFunc:           func() nvml.Return { return nvml.SUCCESS },
		ShutdownFunc:       func() nvml.Return { return nvml.SUCCESS },
		ErrorStringFunc:    func(r nvml.Return) string { return "mock error" },
		DeviceGetCountFunc: func() (int, nvml.Return) { return len(gpus), nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			return gpus[i].dev, nvml.SUCCESS
		},
		EventSetCreateFunc: func() (nvml.EventSet, nvml.Return) { return es, nvml.SUCCESS },
	}
}

func TestNoLibraryMeansNoGPU(t *testing.T) {
	lib := &mock.Interface{InitFunc: func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND }}
	m := New(lib, prometheus.NewRegistry(), zap.NewNop())
	m.Poll()
	if present, gpus := m.Snapshot(); present || len(gpus) != 0 {
		t.Fatalf("present %v, %d gpus", present, len(gpus))
	}
	m.Shutdown()
}

func TestHealthyThenECCThenXID(t *testing.T) {
	gpus := []*fakeGPU{newFakeGPU("NVIDIA H100 80GB HBM3"), newFakeGPU("NVIDIA H100 80GB HBM3")}
	var events []nvml.EventData
	reg := prometheus.NewRegistry()
	m := New(fakeLib(gpus, &events), reg, zap.NewNop())
	defer m.Shutdown()

	m.Poll()
	present, snap := m.Snapshot()
	if !present || len(snap) != 2 {
		t.Fatalf("present %v, %d gpus", present, len(snap))
	}
	g := snap[0]
	if !g.GetHealthy() || g.GetName() != "NVIDIA H100 80GB HBM3" || g.GetMemoryTotalBytes() != 80<<30 || g.GetTemperatureCelsius() != 41 || g.GetUtilizationPercent() != 37 {
		t.Fatalf("gpu 0: %+v", g)
	}
	if got := gauge(t, reg, "kvferry_gpu_utilization_ratio", "0"); got != 0.37 {
		t.Fatalf("utilization gauge %v", got)
	}

	gpus[1].ecc = 3
	m.Poll()
	_, snap = m.Snapshot()
	if snap[1].GetHealthy() || snap[1].GetReason() != "3 uncorrected ECC errors" || !snap[0].GetHealthy() {
		t.Fatalf("after ECC: %+v / %+v", snap[0], snap[1])
	}

	events = append(events, nvml.EventData{Device: gpus[0].dev, EventType: nvml.EventTypeXidCriticalError, EventData: 79})
	m.Poll()
	_, snap = m.Snapshot()
	if snap[0].GetHealthy() || snap[0].GetCriticalXidEvents() != 1 {
		t.Fatalf("after XID 79: %+v", snap[0])
	}
	if got := gauge(t, reg, "kvferry_gpu_critical_xid_events", "0"); got != 1 {
		t.Fatalf("xid gauge %v", got)
	}
}

// The engine's GPUs, named as llama.cpp describes them, are matched to
// NVML devices by name in order; the gauge and the snapshot mark them.
func TestUseByEngine(t *testing.T) {
	gpus := []*fakeGPU{newFakeGPU("NVIDIA H200"), newFakeGPU("NVIDIA L4"), newFakeGPU("NVIDIA H200")}
	var events []nvml.EventData
	reg := prometheus.NewRegistry()
	m := New(fakeLib(gpus, &events), reg, zap.NewNop())
	defer m.Shutdown()
	if missing := m.UseByEngine([]string{"NVIDIA H200", "NVIDIA H200", "NVIDIA H200", "NVIDIA A100"}); !slices.Equal(missing, []string{"NVIDIA H200", "NVIDIA A100"}) {
		t.Fatalf("unmatched %q", missing)
	}
	m.Poll()
	_, snap := m.Snapshot()
	for i, want := range []bool{true, false, true} {
		if snap[i].GetEngine() != want {
			t.Fatalf("gpu %d engine %v, want %v", i, snap[i].GetEngine(), want)
		}
		if got := gauge(t, reg, "kvferry_gpu_engine", strconv.Itoa(i)); got != map[bool]float64{true: 1}[want] {
			t.Fatalf("gpu %d engine gauge %v", i, got)
		}
	}
}

// gauge reads one GPU gauge from the registry, as a scrape would.
func gauge(t *testing.T, reg *prometheus.Registry, name, gpu string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "gpu" && l.GetValue() == gpu {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{gpu=%q}", name, gpu)
	return 0
}
