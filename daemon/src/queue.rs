//! The queue's start order: an in-memory index of QUEUED experiments, rebuilt from the store
//! at start-up. Higher priority first; within a priority, submission (id) order.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use ppu_proto::v1::Experiment;

#[derive(Debug, Default)]
pub struct QueueIndex {
    order: BTreeSet<(Reverse<i32>, String)>,
}

impl QueueIndex {
    pub fn insert(&mut self, e: &Experiment) {
        self.order.insert((Reverse(priority(e)), e.id.clone()));
    }

    pub fn remove(&mut self, e: &Experiment) {
        self.order.remove(&(Reverse(priority(e)), e.id.clone()));
    }

    /// The experiment that starts next.
    pub fn first(&self) -> Option<&str> {
        self.order.first().map(|(_, id)| id.as_str())
    }

    /// Ids in start order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|(_, id)| id.as_str())
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn priority(e: &Experiment) -> i32 {
    e.spec.as_ref().map_or(0, |s| s.priority)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppu_proto::v1::ExperimentSpec;

    fn exp(id: &str, priority: i32) -> Experiment {
        Experiment {
            id: id.into(),
            spec: Some(ExperimentSpec {
                priority,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn higher_priority_first_then_submission_order() {
        let mut q = QueueIndex::default();
        for e in [
            exp("01", 0),
            exp("02", 5),
            exp("03", 0),
            exp("04", 5),
            exp("05", -1),
        ] {
            q.insert(&e);
        }
        assert_eq!(q.ids().collect::<Vec<_>>(), ["02", "04", "01", "03", "05"]);
        q.remove(&exp("02", 5));
        assert_eq!(q.first(), Some("04"));
        assert_eq!(q.len(), 4);
    }
}
