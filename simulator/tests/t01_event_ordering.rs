//! Events pop in time order; at equal times arrivals come before step completions, and
//! otherwise in insertion order.

use simulator::engine::{EventKind, EventQueue};

#[test]
fn events_pop_in_time_then_kind_then_insertion_order() {
    let mut q = EventQueue::default();
    q.push(2.0, EventKind::StepDone);
    q.push(1.0, EventKind::Arrival(7));
    q.push(2.0, EventKind::Arrival(3));
    q.push(0.5, EventKind::Arrival(1));
    q.push(2.0, EventKind::Arrival(4));
    q.push(1.0, EventKind::StepDone);
    let order: Vec<(f64, EventKind)> = std::iter::from_fn(|| q.pop()).map(|e| (e.time, e.kind)).collect();
    assert_eq!(
        order,
        vec![
            (0.5, EventKind::Arrival(1)),
            (1.0, EventKind::Arrival(7)),
            (1.0, EventKind::StepDone),
            (2.0, EventKind::Arrival(3)),
            (2.0, EventKind::Arrival(4)),
            (2.0, EventKind::StepDone),
        ]
    );
    assert!(q.is_empty());
}
