package controlplane

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fwdproxy/fwdproxy/pkg/catalog"
	"github.com/fwdproxy/fwdproxy/pkg/discovery"
)

// largeCatalog is n services with two ports each: a shared HTTP port routed by Host and a TCP port
// of their own.
func largeCatalog(n int) *catalog.Catalog {
	c := &catalog.Catalog{}
	for i := 0; i < n; i++ {
		c.Services = append(c.Services, catalog.Service{
			Host:       fmt.Sprintf("svc-%05d.ns-%03d.svc.cluster.local", i, i%100),
			Ports:      []catalog.Port{{Number: 8080, Protocol: catalog.HTTP}, {Number: uint32(20000 + i), Protocol: catalog.TCP}},
			Identities: []string{fmt.Sprintf("spiffe://cluster.local/ns/ns-%03d/sa/svc-%05d", i%100, i)},
		})
	}
	c.Normalize()
	return c
}

func benchOptions() Options {
	return Options{
		ListenAddress: "0.0.0.0", ConnectTimeout: 5 * time.Second, AccessLog: true,
		Outlier: Outlier{ConsecutiveErrors: 5, Interval: 10 * time.Second, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50},
		Gateways: []Gateway{
			{Name: "a", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:15443")}},
			{Name: "b", Addresses: []netip.AddrPort{netip.MustParseAddrPort("10.0.1.1:15443")}},
		},
	}
}

// BenchmarkTranslate10kServices measures catalog -> validated, versioned snapshot for 10,000
// services x 2 ports (20,000 clusters, 10,001 listeners). peak-RSS-MiB is the process's high-water
// mark (VmHWM), so run it alone: go test ./pkg/controlplane -run '^$' -bench Translate10k -benchmem
func BenchmarkTranslate10kServices(b *testing.B) {
	cat := largeCatalog(10000)
	opts := benchOptions()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := 0; i < b.N; i++ {
		res, err := Translate(cat, opts)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := NewSnapshot(res, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	reportCPU(b, cpu0)
	if hwm := peakRSSMiB(); hwm > 0 {
		b.ReportMetric(hwm, "peak-RSS-MiB")
	}
}

// BenchmarkTranslateOnly10kServices isolates translation from validation and hashing.
func BenchmarkTranslateOnly10kServices(b *testing.B) {
	cat := largeCatalog(10000)
	opts := benchOptions()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := 0; i < b.N; i++ {
		if _, err := Translate(cat, opts); err != nil {
			b.Fatal(err)
		}
	}
	reportCPU(b, cpu0)
}

// cpuTime is the process's user+system CPU time so far. Reported per operation beside ns/op,
// it stays meaningful on a shared machine where wall time includes waiting for a core.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU adds cpu-ms/op for the operations since start.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(time.Millisecond)/float64(b.N), "cpu-ms/op")
}

func peakRSSMiB() float64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func TestLargeCatalogTranslates(t *testing.T) {
	res, err := Translate(largeCatalog(300), benchOptions())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Clusters) != 600 || len(res.Listeners) != 301 || len(res.Routes[0].VirtualHosts) != 300 {
		t.Fatalf("%d clusters, %d listeners", len(res.Clusters), len(res.Listeners))
	}
	if _, err := NewSnapshot(res, nil); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkRebuildOneChange10kServices measures the daemon's steady state: one service changes in
// a 10,000-service catalog and the snapshot is rebuilt (unchanged resources are not re-validated).
func BenchmarkRebuildOneChange10kServices(b *testing.B) {
	// As the daemon does it: an operator entry overrides one of 10,000 discovered services with
	// a new identity each time; the sources are merged (discovery.Merger), translated and built.
	discovered := largeCatalog(10000)
	var merger discovery.Merger
	cat, _ := merger.Merge(catalog.Options{}, nil, discovered)
	opts := benchOptions()
	var translator Translator
	var builder Builder
	res, _ := translator.Translate(cat, opts)
	if _, err := builder.Build(res, nil); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := 0; i < b.N; i++ {
		over := discovered.Services[0].Clone()
		over.Identities = []string{fmt.Sprintf("spiffe://cluster.local/ns/x/sa/changed-%d", i)}
		cat, _ := merger.Merge(catalog.Options{}, &catalog.Catalog{Services: []catalog.Service{over}}, discovered)
		res, err := translator.Translate(cat, opts)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := builder.Build(res, nil); err != nil {
			b.Fatal(err)
		}
	}
	reportCPU(b, cpu0)
}
