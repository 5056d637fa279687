package peers

import (
	"slices"
	"time"

	"github.com/hashicorp/memberlist"
)

// events implements memberlist.EventDelegate: it keeps the member table (memberlist calls it with
// its node lock held, so the node is copied here) and recomputes leadership.
type events Node

func (e *events) record(m *memberlist.Node) {
	c := *m
	c.Meta = slices.Clone(m.Meta)
	c.Addr = slices.Clone(m.Addr)
	e.tableMu.Lock()
	e.table[c.Name] = c
	delete(e.lost, c.Address())
	delete(e.gone, c.Name)
	e.tableMu.Unlock()
}

func (e *events) NotifyJoin(m *memberlist.Node) {
	e.record(m)
	n := (*Node)(e)
	if m.Name != n.cfg.Name {
		n.log.Info("peer joined", "peer", m.Name, "addr", m.Address())
	}
	n.poke()
}

func (e *events) NotifyLeave(m *memberlist.Node) {
	e.tableMu.Lock()
	last, ok := e.table[m.Name]
	state := StateDead
	if metaLeaving(m.Meta) || ok && metaLeaving(last.Meta) {
		state = StateLeft
	}
	c := *m
	c.Meta, c.Addr = slices.Clone(m.Meta), slices.Clone(m.Addr)
	e.gone[m.Name] = gone{node: c, state: state, since: time.Now()}
	delete(e.suspect, m.Name)
	delete(e.table, m.Name)
	// A failed member is retried with the seeds (a partition heals even without a seed on the
	// other side); one that announced its departure is not.
	if state == StateDead {
		e.lost[m.Address()] = time.Now()
	}
	e.tableMu.Unlock()
	n := (*Node)(e)
	if state == StateLeft {
		n.log.Info("peer left", "peer", m.Name, "addr", m.Address())
	} else {
		select {
		case n.rejoin <- struct{}{}:
		default:
		}
		n.log.Warn("peer failed: declared dead by the fleet (crashed, or unreachable from here)", "peer", m.Name, "addr", m.Address())
	}
	n.poke()
}

func (e *events) NotifyUpdate(m *memberlist.Node) {
	e.record(m)
	(*Node)(e).poke()
}
