package backoff

import (
	"context"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// Spread doubles from initial to max, each delay in [d/2, d): never above max, never below half.
func TestSpread(t *testing.T) {
	b := New(Spread(time.Second, 30*time.Second))
	want := []time.Duration{1, 2, 4, 8, 16, 30, 30, 30}
	for round := 0; round < 2; round++ {
		for i, w := range want {
			w *= time.Second
			if got := b.Next(); got < w/2 || got >= w {
				t.Fatalf("round %d, delay %d: %v, want in [%v, %v)", round, i, got, w/2, w)
			}
		}
		b.Reset() // starts over from the first delay
	}
}

// A wait.Backoff policy keeps its own jitter (upwards) and cap, and never runs out of steps.
func TestPolicy(t *testing.T) {
	b := New(wait.Backoff{Duration: time.Second, Factor: 2, Jitter: 0.2, Steps: 1, Cap: 4 * time.Second})
	for i, w := range []time.Duration{1, 2, 4, 4, 4} {
		w *= time.Second
		if got := b.Next(); got < w || got > w+w/5 {
			t.Fatalf("delay %d: %v, want in [%v, %v]", i, got, w, w+w/5)
		}
	}
}

func TestSleep(t *testing.T) {
	if !Sleep(context.Background(), time.Millisecond) || !Sleep(context.Background(), 0) {
		t.Fatal("Sleep did not report the delay elapsed")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) || Sleep(ctx, 0) {
		t.Fatal("Sleep on a done context reported the delay elapsed")
	}
}
