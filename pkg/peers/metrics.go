package peers

import (
	"bytes"
	"context"
	"log"
	"log/slog"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	rejected   *prometheus.CounterVec
	stateBytes prometheus.Histogram
}

func newMetrics(n *Node, reg prometheus.Registerer) *metrics {
	m := &metrics{
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fwdproxy_gossip_messages_rejected_total",
			Help: "Gossip messages or entries rejected, by reason (malformed, oversized, version, invalid_entry, clock_skew, encryption).",
		}, []string{"reason"}),
		stateBytes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fwdproxy_gossip_state_bytes",
			Help:    "Size of the full state this peer sends in a push/pull exchange.",
			Buckets: prometheus.ExponentialBuckets(1024, 4, 9),
		}),
	}
	for _, r := range []string{"malformed", "oversized", "version", "invalid_entry", "clock_skew", "encryption"} {
		m.rejected.WithLabelValues(r)
	}
	if reg == nil {
		return m
	}
	boolf := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	reg.MustRegister(m.rejected, m.stateBytes,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_members", Help: "Alive members of the fleet, this peer included."},
			func() float64 { return float64(n.ml.NumMembers()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_health_score", Help: "memberlist awareness score: 0 is healthy, higher means slow or lossy."},
			func() float64 { return float64(n.ml.GetHealthScore()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_converged", Help: "1 when every member advertises this peer's configuration digest."},
			func() float64 { return boolf(n.Converged()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_store_entries", Help: "Live entries in the replicated fleet store."},
			func() float64 { _, k := n.store.Digest(); return float64(k) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_fleet_leader", Help: "1 on the peer that runs discovery for the fleet."},
			func() float64 { return boolf(n.Leader()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_synced", Help: "1 once this peer holds the fleet's full state (a join exchanged it, or no other peer exists)."},
			func() float64 { return boolf(n.synced.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_isolated", Help: "1 when this peer expects peers but reaches none."},
			func() float64 { return boolf(n.Health().Isolated) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fwdproxy_gossip_partition_suspected", Help: "1 when members failed and this peer sees no more than half of the fleet it knew."},
			func() float64 { return boolf(n.Health().PartitionSuspected) }),
		memberStates{n},
	)
	return m
}

// memberlistLog turns memberlist's "[LEVEL] memberlist: text" lines into structured logs. Lines
// about messages memberlist could not take (undecryptable: a peer with another gossip key;
// undecodable: garbage on the port) are counted as rejected messages by reason. Each kind of
// line is logged a few times a minute at most (ratelog), the rest only counted, since whatever
// reaches the gossip port can send them at line rate.
type memberlistLog struct{ n *Node }

func newMemberlistLogger(n *Node) *log.Logger { return log.New(memberlistLog{n}, "", 0) }

// malformedLines are memberlist's words for a message it could not decode or had to drop.
var malformedLines = []string{
	"not supported", "invalid msgtype", "failed to decode", "missing message type", "packet too short",
	"invalid checksum", "unacceptable label", "label header", "failed to receive", "failed to decompress",
	"failed to read remote state", "truncated messages", "remote node state size",
}

func (w memberlistLog) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	for tag, lv := range map[string]slog.Level{"[DEBUG]": slog.LevelDebug, "[INFO]": slog.LevelInfo, "[WARN]": slog.LevelWarn, "[ERR]": slog.LevelError, "[ERROR]": slog.LevelError} {
		if strings.HasPrefix(line, tag) {
			level = lv
			line = strings.TrimSpace(strings.TrimPrefix(line, tag))
		}
	}
	line = strings.TrimPrefix(line, "memberlist: ")
	if name, ok := suspectFromLog(line); ok {
		w.n.markSuspect(name)
	}
	lower := strings.ToLower(line)
	if strings.Contains(lower, "decrypt") || strings.Contains(lower, "no installed keys") ||
		strings.Contains(lower, "encryption is configured") || strings.Contains(lower, "encryption is not configured") {
		w.n.metrics.rejected.WithLabelValues("encryption").Inc()
		if ok, left := w.n.logLimit.Allow("encryption"); ok {
			w.n.log.Error("gossip from a peer rejected: it is not encrypted with this fleet's key; check that peers.keyring is the same file on every instance",
				"detail", line, "not_logged_since_last", left)
		}
		return len(p), nil
	}
	if level >= slog.LevelWarn && slices.ContainsFunc(malformedLines, func(s string) bool { return strings.Contains(lower, s) }) {
		w.n.metrics.rejected.WithLabelValues("malformed").Inc()
		if ok, left := w.n.logLimit.Allow("malformed"); ok {
			w.n.log.Warn("gossip message rejected; not applied", "reason", "malformed", "via", "memberlist", "detail", line, "not_logged_since_last", left)
		}
		return len(p), nil
	}
	if level >= slog.LevelInfo {
		if ok, left := w.n.logLimit.Allow(lineKind(line)); !ok {
			return len(p), nil
		} else if left > 0 {
			w.n.log.Log(context.Background(), level, line, "component", "memberlist", "not_logged_since_last", left)
			return len(p), nil
		}
	}
	w.n.log.Log(context.Background(), level, line, "component", "memberlist")
	return len(p), nil
}

// lineKind is what tells one kind of log line from another: its first words (the rest names
// peers, addresses and errors).
func lineKind(line string) string {
	f := strings.Fields(line)
	return strings.Join(f[:min(len(f), 4)], " ")
}

// memberStates exports fwdproxy_gossip_member_states{state}: members by state, as this peer sees
// them (dead and left members are kept for a while after they go).
type memberStates struct{ n *Node }

var memberStatesDesc = prometheus.NewDesc("fwdproxy_gossip_member_states",
	"Members of the fleet by state as this peer sees them: alive, suspect (its probes fail), dead (declared failed), left (departed gracefully).",
	[]string{"state"}, nil)

func (m memberStates) Describe(ch chan<- *prometheus.Desc) { ch <- memberStatesDesc }

func (m memberStates) Collect(ch chan<- prometheus.Metric) {
	count := map[string]int{StateAlive: 0, StateSuspect: 0, StateDead: 0, StateLeft: 0}
	for _, mm := range m.n.Members() {
		count[mm.State]++
	}
	for st, k := range count {
		ch <- prometheus.MustNewConstMetric(memberStatesDesc, prometheus.GaugeValue, float64(k), st)
	}
}
