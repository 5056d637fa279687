package procstat

import (
	"os"
	"testing"
)

func TestOwnProcess(t *testing.T) {
	x := 0
	for i := range 50_000_000 { // some CPU time to read back
		x += i
	}
	if cpu := CPUSeconds(os.Getpid()); cpu <= 0 {
		t.Errorf("CPU seconds of this process: %v (x=%d)", cpu, x)
	}
	rss, hwm, err := MemMiB(os.Getpid())
	if err != nil || rss <= 0 || hwm < rss {
		t.Errorf("memory of this process: rss %v MiB, peak %v MiB (%v)", rss, hwm, err)
	}
	if _, _, err := MemMiB(-1); err == nil {
		t.Error("no error for a process that does not exist")
	}
}
