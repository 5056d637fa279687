package ratelog

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	now := time.Unix(1000, 0)
	l := &Limiter{Burst: 3, Window: time.Minute, Now: func() time.Time { return now }}
	logged := 0
	for range 100 {
		if ok, _ := l.Allow("bad packet"); ok {
			logged++
		}
	}
	if logged != 3 {
		t.Fatalf("%d of 100 logged in one window, want 3", logged)
	}
	if ok, _ := l.Allow("other kind"); !ok {
		t.Fatal("another kind is limited apart")
	}
	now = now.Add(time.Minute)
	ok, left := l.Allow("bad packet")
	if !ok || left != 97 {
		t.Fatalf("next window: ok %v, suppressed %d; want the 97 left out reported", ok, left)
	}
	if ok, left := l.Allow("bad packet"); !ok || left != 0 {
		t.Fatalf("second line of the new window: %v %d", ok, left)
	}
}

func TestLimiterForgetsKindsPastItsBound(t *testing.T) {
	l := &Limiter{Burst: 1}
	for i := range 3 * maxKeys {
		l.Allow(string(rune(i)))
	}
	if len(l.keys) > maxKeys+1 {
		t.Fatalf("%d kinds remembered", len(l.keys))
	}
}
