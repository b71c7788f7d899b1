//! The queue's start order: an in-memory index of QUEUED experiments (held ones included),
//! rebuilt from the store at start-up.
//!
//! Order is by [`OrderKey`]: higher priority first; within a priority, by rank, then id. A new
//! experiment gets a rank above every rank handed out so far, so equal priorities run in
//! submission order. `MoveExperiment` needs to put an experiment *between* two others: it takes
//! the priority of its new neighbour and every experiment of that priority gets a fresh rank in
//! the new order ([`QueueIndex::plan_move`]), so a move never disturbs the order of the others.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Gap between consecutive ranks handed out; any value > 0 works, a gap keeps numbers readable.
pub const RANK_SPACING: i64 = 1024;

/// Where an experiment sorts: priority (higher first), rank, id. The id is shared (one
/// allocation per queued experiment, however many indexes hold its key), and cloning a key
/// copies no string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderKey {
    pub priority: i32,
    pub rank: i64,
    pub id: Arc<str>,
}

impl OrderKey {
    pub fn new(priority: i32, rank: i64, id: impl Into<Arc<str>>) -> Self {
        Self {
            priority,
            rank,
            id: id.into(),
        }
    }

    fn tuple(&self) -> (Reverse<i32>, i64, &str) {
        (Reverse(self.priority), self.rank, &self.id)
    }
}

impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a move changes: the moved experiment's new priority and the new rank of every
/// experiment of that priority (the moved one included).
#[derive(Debug, Clone, PartialEq)]
pub struct MovePlan {
    pub id: String,
    pub priority: i32,
    pub ranks: Vec<(String, i64)>,
}

#[derive(Debug, Default)]
pub struct QueueIndex {
    order: BTreeSet<OrderKey>,
    keys: HashMap<Arc<str>, OrderKey>,
    next_rank: i64,
}

impl QueueIndex {
    /// A rank above every rank handed out or loaded so far.
    pub fn alloc_rank(&mut self) -> i64 {
        self.next_rank += RANK_SPACING;
        self.next_rank
    }

    /// Makes sure future ranks sort after `rank` (ranks loaded from the store).
    pub fn observe_rank(&mut self, rank: i64) {
        self.next_rank = self.next_rank.max(rank);
    }

    pub fn insert(&mut self, key: OrderKey) {
        self.observe_rank(key.rank);
        self.remove(&key.id);
        self.keys.insert(key.id.clone(), key.clone());
        self.order.insert(key);
    }

    pub fn remove(&mut self, id: &str) -> Option<OrderKey> {
        let key = self.keys.remove(id)?;
        self.order.remove(&key);
        Some(key)
    }

    pub fn key(&self, id: &str) -> Option<&OrderKey> {
        self.keys.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Keys in start order.
    pub fn keys(&self) -> impl Iterator<Item = &OrderKey> {
        self.order.iter()
    }

    /// Ids in start order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|k| &*k.id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// How to move `id` to `position` (0 = first; past the end = last): it takes the priority
    /// of the experiment it lands in front of (of the last one when moved to the end), and
    /// that priority's experiments are re-ranked in the new order. `None` if `id` is not
    /// queued. Allocates fresh ranks; apply the plan with [`QueueIndex::apply_move`].
    pub fn plan_move(&mut self, id: &str, position: usize) -> Option<MovePlan> {
        let own = self.keys.get(id)?.clone();
        let others: Vec<&OrderKey> = self.order.iter().filter(|k| &*k.id != id).collect();
        let p = position.min(others.len());
        let priority = others
            .get(p)
            .or_else(|| p.checked_sub(1).and_then(|i| others.get(i)))
            .map_or(own.priority, |k| k.priority);
        // The class in its new order: members before position p, then the moved one, then
        // the rest.
        let mut class: Vec<String> = Vec::new();
        for (i, k) in others.iter().enumerate() {
            if i == p {
                class.push(id.to_owned());
            }
            if k.priority == priority {
                class.push(k.id.to_string());
            }
        }
        if p == others.len() {
            class.push(id.to_owned());
        }
        let ranks = class
            .into_iter()
            .map(|member| (member, self.alloc_rank()))
            .collect();
        Some(MovePlan {
            id: id.to_owned(),
            priority,
            ranks,
        })
    }

    /// Applies a committed [`MovePlan`].
    pub fn apply_move(&mut self, plan: &MovePlan) {
        for (member, rank) in &plan.ranks {
            if let Some(mut key) = self.remove(member) {
                key.rank = *rank;
                if *member == plan.id {
                    key.priority = plan.priority;
                }
                self.insert(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, i32)]) -> QueueIndex {
        let mut q = QueueIndex::default();
        for (id, priority) in entries {
            let rank = q.alloc_rank();
            q.insert(OrderKey::new(*priority, rank, *id));
        }
        q
    }

    fn ids(q: &QueueIndex) -> Vec<&str> {
        q.ids().collect()
    }

    #[test]
    fn higher_priority_first_then_submission_order() {
        let mut q = index(&[("01", 0), ("02", 5), ("03", 0), ("04", 5), ("05", -1)]);
        assert_eq!(ids(&q), ["02", "04", "01", "03", "05"]);
        q.remove("02");
        assert_eq!(ids(&q).first(), Some(&"04"));
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn a_later_submission_sorts_after_loaded_ranks() {
        let mut q = QueueIndex::default();
        q.insert(OrderKey::new(0, 50_000, "old"));
        let r = q.alloc_rank();
        q.insert(OrderKey::new(0, r, "new"));
        assert_eq!(ids(&q), ["old", "new"]);
    }

    #[test]
    fn moves_land_exactly_at_the_position_and_take_the_neighbours_priority() {
        let mut q = index(&[("a", 5), ("b", 5), ("c", 0), ("d", 0), ("e", 0)]);
        // To the front: takes the priority of the one it lands in front of.
        let plan = q.plan_move("e", 0).unwrap();
        assert_eq!(plan.priority, 5);
        q.apply_move(&plan);
        assert_eq!(ids(&q), ["e", "a", "b", "c", "d"]);
        // Between two of equal priority and equal (default) rank order.
        let plan = q.plan_move("a", 3).unwrap();
        q.apply_move(&plan);
        assert_eq!(ids(&q), ["e", "b", "c", "a", "d"]);
        assert_eq!(plan.priority, 0);
        // Past the end: last, with the last one's priority.
        let plan = q.plan_move("e", 99).unwrap();
        q.apply_move(&plan);
        assert_eq!(ids(&q), ["b", "c", "a", "d", "e"]);
        assert_eq!(plan.priority, 0);
        // A no-op move keeps the order.
        let plan = q.plan_move("c", 1).unwrap();
        q.apply_move(&plan);
        assert_eq!(ids(&q), ["b", "c", "a", "d", "e"]);
        // New submissions still go last within their priority.
        let r = q.alloc_rank();
        q.insert(OrderKey::new(0, r, "f"));
        assert_eq!(ids(&q), ["b", "c", "a", "d", "e", "f"]);
        assert!(q.plan_move("zz", 0).is_none());
    }

    #[test]
    fn every_position_of_every_member_is_reachable() {
        let names = ["a", "b", "c", "d", "e", "f"];
        let prios = [3, 3, 1, 1, 1, 0];
        for from in 0..names.len() {
            for to in 0..names.len() {
                let mut q = index(&names.iter().copied().zip(prios).collect::<Vec<_>>());
                let before: Vec<String> = ids(&q).iter().map(|s| s.to_string()).collect();
                let id = before[from].clone();
                let plan = q.plan_move(&id, to).unwrap();
                q.apply_move(&plan);
                let mut expected = before.clone();
                expected.remove(from);
                expected.insert(to, id.clone());
                assert_eq!(ids(&q), expected, "move {id} from {from} to {to}");
            }
        }
    }
}
